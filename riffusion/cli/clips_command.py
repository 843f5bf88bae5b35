"""``riffusion sample-clips``: cuts clips from an audio file (numpy and soundfile, no torch)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from riffusion.audio import SUPPORTED_FORMATS, Audio, AudioError, read_audio, write_audio
from riffusion.cli.errors import friendly_errors


@click.command("sample-clips")
@click.argument("audio_file", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--num-clips", type=click.IntRange(min=1), default=4, show_default=True, help="Clips to cut."
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=5.12,
    show_default=True,
    help="Clip length in seconds.",
)
@click.option(
    "--mode",
    type=click.Choice(["random", "even"]),
    default="random",
    show_default=True,
    help="Random start times, or evenly spaced from the start to the end.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --mode random.")
@click.option(
    "--format",
    "audio_format",
    type=click.Choice(SUPPORTED_FORMATS),
    default="wav",
    show_default=True,
    help="Audio format of the clips.",
)
def sample_clips(
    audio_file: Path,
    output_dir: Path,
    num_clips: int,
    duration: float,
    mode: str,
    seed: int,
    audio_format: str,
) -> None:
    """Cut NUM_CLIPS clips of DURATION seconds from AUDIO_FILE into OUTPUT_DIR."""
    with friendly_errors(AudioError, OSError):
        audio = read_audio(audio_file)
        clip_frames = round(duration * audio.sample_rate)
        if clip_frames > audio.num_frames:
            raise AudioError(
                f"clips of {duration:g} s do not fit in {audio_file} ({audio.duration_s:.2f} s)"
            )
        last_start = audio.num_frames - clip_frames
        if mode == "even":
            starts = np.linspace(0, last_start, num_clips).round().astype(int)
        else:
            starts = np.sort(np.random.default_rng(seed).integers(0, last_start + 1, num_clips))
        output_dir.mkdir(parents=True, exist_ok=True)
        for index, start in enumerate(starts):
            clip = Audio(audio.samples[:, start : start + clip_frames], audio.sample_rate)
            name = f"{audio_file.stem}_clip{index:03d}_{start / audio.sample_rate:.2f}s"
            write_audio(clip, output_dir / f"{name}.{audio_format}")
    click.echo(f"wrote {num_clips} clips of {duration:g} s to {output_dir}")
