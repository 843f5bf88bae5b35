"""Audio/spectrogram subcommands (no model needed).

Every command turns expected failures (bad audio, bad images, unknown ids)
into a one-line ``Error: ...`` and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from riffusion.audio import (
    DEFAULT_SAMPLE_RATE,
    SUPPORTED_FORMATS,
    Audio,
    AudioError,
    normalize_loudness,
    read_audio,
    resample,
    to_mono,
    to_stereo,
    write_audio,
)
from riffusion.seed_images import SeedImageError, SeedImageLibrary, generate_library
from riffusion.spectrogram import (
    SpectrogramError,
    SpectrogramParams,
    audio_from_image,
    image_from_audio,
    resolve_device,
)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3"}
# Reflect padding of the STFT needs more than half the 400 ms FFT.
MIN_SPECTROGRAM_AUDIO_S = 0.25
EXPECTED_ERRORS = (AudioError, SpectrogramError, SeedImageError, OSError)


def default_device() -> str:
    return str(resolve_device())


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise click.BadParameter(f"not a torch device: {value!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu")
    return value


device_option = click.option(
    "--device",
    default=default_device,
    show_default="cuda if available, else cpu",
    callback=_check_device,
    help="Torch device for the spectrogram transforms.",
)
channels_option = click.option(
    "--stereo/--mono",
    default=None,
    help="Spectrogram channels (default: stereo for stereo input, mono otherwise).",
)


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn expected failures into click errors (one line, exit code 1)."""
    try:
        yield
    except UnidentifiedImageError as error:
        raise click.ClickException(f"not a readable image: {error}") from error
    except EXPECTED_ERRORS as error:
        raise click.ClickException(str(error)) from error


def load_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise SpectrogramError(f"not a readable image file: {path}") from None
    return image


def prepare_audio(audio: Audio, stereo: bool | None) -> tuple[Audio, SpectrogramParams]:
    """Resample to the model's rate and pick the channel layout."""
    audio = resample(audio, DEFAULT_SAMPLE_RATE)
    if stereo is None:
        stereo = audio.channels >= 2
    audio = to_stereo(audio) if stereo else to_mono(audio)
    return audio, SpectrogramParams(stereo=stereo)


def save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=image.getexif())


def convert_audio_file(
    source: Path, output: Path, stereo: bool | None, device: str, max_duration_s: float | None
) -> Image.Image:
    audio = read_audio(
        source, max_duration_s=max_duration_s, min_duration_s=MIN_SPECTROGRAM_AUDIO_S
    )
    audio, params = prepare_audio(audio, stereo)
    image = image_from_audio(audio, params, device=device)
    save_image(image, output)
    return image


@click.command("audio-to-image")
@click.argument("audio_file", type=click.Path(path_type=Path))
@click.argument("image_file", type=click.Path(dir_okay=False, path_type=Path))
@channels_option
@click.option("--max-duration", type=float, default=None, help="Refuse audio longer than this (s).")
@device_option
def audio_to_image(
    audio_file: Path, image_file: Path, stereo: bool | None, max_duration: float | None, device: str
) -> None:
    """Convert AUDIO_FILE (wav/flac/ogg/mp3) to a spectrogram IMAGE_FILE (png, with EXIF).

    The audio is resampled to 44.1 kHz; one pixel column is 10 ms.
    """
    with friendly_errors():
        image = convert_audio_file(audio_file, image_file, stereo, device, max_duration)
    click.echo(f"wrote {image_file} ({image.width}x{image.height} px)")


@click.command("image-to-audio")
@click.argument("image_file", type=click.Path(path_type=Path))
@click.argument("audio_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Griffin-Lim phase seed.")
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="Normalise loudness to -12 dBFS RMS (peak <= 0.99).",
)
@device_option
def image_to_audio(
    image_file: Path, audio_file: Path, seed: int, normalize: bool, device: str
) -> None:
    """Reconstruct audio from a spectrogram IMAGE_FILE into AUDIO_FILE (format from suffix).

    Uses the image's EXIF spectrogram parameters (defaults when missing) and
    Griffin-Lim phase reconstruction.
    """
    with friendly_errors():
        image = load_image(image_file)
        generator = torch.Generator().manual_seed(seed)
        audio = audio_from_image(image, device=device, generator=generator)
        if normalize:
            audio = normalize_loudness(audio)
        audio_file.parent.mkdir(parents=True, exist_ok=True)
        write_audio(audio, audio_file)
    click.echo(f"wrote {audio_file} ({audio.duration_s:.2f} s, {audio.channels} ch)")


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
    with friendly_errors():
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


@click.command("audio-to-images")
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@channels_option
@click.option("--max-duration", type=float, default=None, help="Skip audio longer than this (s).")
@device_option
def audio_to_images(
    input_dir: Path, output_dir: Path, stereo: bool | None, max_duration: float | None, device: str
) -> None:
    """Convert every audio file in INPUT_DIR to a spectrogram PNG in OUTPUT_DIR.

    A file that fails is reported and skipped; the exit code is 1 if any failed.
    """
    sources = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not sources:
        raise click.ClickException(
            f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {input_dir}"
        )
    console = Console(stderr=True)
    failures: list[tuple[Path, str]] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("converting", total=len(sources))
        for source in sources:
            progress.update(task, description=source.name)
            try:
                convert_audio_file(
                    source, output_dir / f"{source.stem}.png", stereo, device, max_duration
                )
            except EXPECTED_ERRORS as error:
                failures.append((source, str(error)))
                progress.console.print(f"[red]skipped[/red] {source.name}: {error}", soft_wrap=True)
            progress.advance(task)
    converted = len(sources) - len(failures)
    click.echo(f"converted {converted} of {len(sources)} files into {output_dir}")
    if failures:
        raise click.ClickException(
            f"{len(failures)} file(s) failed: {', '.join(path.name for path, _ in failures)}"
        )


@click.command("make-seed-images")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def make_seed_images(directory: Path) -> None:
    """(Re)generate the seed and mask images plus manifest.json in DIRECTORY (deterministic)."""
    with friendly_errors():
        infos = generate_library(directory)
    seeds = sum(info.kind == "seed" for info in infos)
    click.echo(f"wrote {seeds} seed and {len(infos) - seeds} mask images to {directory}")


@click.command("seed-images")
@click.option("--kind", type=click.Choice(["seed", "mask"]), default=None, help="Only this kind.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Library folder (default: the project's seed_images/ or $RIFFUSION_SEED_IMAGES_DIR).",
)
def seed_images(kind: str | None, directory: Path | None) -> None:
    """List the seed and mask images available by id."""
    with friendly_errors():
        library = SeedImageLibrary(directory)
    table = Table("id", "kind", "tempo (bpm)", "description", title=str(library.directory))
    for info in library.list(kind):
        tempo = "" if info.tempo_bpm is None else f"{info.tempo_bpm:g}"
        table.add_row(info.id, info.kind, tempo, info.description)
    Console(width=160).print(table)
