"""Audio <-> spectrogram commands: audio-to-image, audio-to-images and image-to-audio.

They need torch and torchaudio (the spectrogram transforms) and nothing of the
model. Expected failures (bad audio, bad images) end in a one-line ``Error: ...``.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from PIL import Image, UnidentifiedImageError

from riffusion.audio import (
    DEFAULT_SAMPLE_RATE,
    Audio,
    AudioError,
    normalize_loudness,
    read_audio,
    resample,
    to_mono,
    to_stereo,
    write_audio,
)
from riffusion.cli.errors import friendly_errors
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
EXPECTED_ERRORS = (AudioError, SpectrogramError, OSError)


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
    with friendly_errors(*EXPECTED_ERRORS):
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
    with friendly_errors(*EXPECTED_ERRORS):
        image = load_image(image_file)
        generator = torch.Generator().manual_seed(seed)
        audio = audio_from_image(image, device=device, generator=generator)
        if normalize:
            audio = normalize_loudness(audio)
        audio_file.parent.mkdir(parents=True, exist_ok=True)
        write_audio(audio, audio_file)
    click.echo(f"wrote {audio_file} ({audio.duration_s:.2f} s, {audio.channels} ch)")


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
    # rich's progress bar: only this command shows one.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
