"""Audio <-> spectrogram commands: audio-to-image, audio-to-images and image-to-audio.

They need torch and torchaudio (the spectrogram transforms) and nothing of the
model, and import them only once the inputs are checked, so a missing or unreadable
file is reported at once. Expected failures (bad audio, bad images) end in a
one-line ``Error: ...``. Long conversions show a progress bar on stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from PIL import Image, UnidentifiedImageError
from rich.progress import (
    TaskID,
)

from riffusion.audio import (
    DEFAULT_SAMPLE_RATE,
    Audio,
    format_for_path,
    normalize_loudness,
    read_audio,
    resample,
    to_mono,
    to_stereo,
    write_audio,
)
from riffusion.cli.console import progress_bar
from riffusion.cli.errors import friendly_errors
from riffusion.progress import listening_to

if TYPE_CHECKING:  # torch: imported once the inputs are checked
    from riffusion.spectrogram import SpectrogramParams

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3"}
# Reflect padding of the STFT needs more than half the 400 ms FFT.
MIN_SPECTROGRAM_AUDIO_S = 0.25
# AudioError and SpectrogramError are ValueErrors.
EXPECTED_ERRORS = (ValueError, OSError)


def checked_device(value: str | None) -> str:
    """``--device`` as a torch device name (imports torch: call after the input checks)."""
    import torch

    from riffusion.spectrogram import resolve_device

    if value is None:
        return str(resolve_device())
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise click.BadParameter(f"not a torch device: {value!r}", param_hint="--device") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(
            "CUDA is not available on this machine; use --device cpu", param_hint="--device"
        )
    return value


device_option = click.option(
    "--device",
    default=None,
    show_default="cuda if available, else cpu",
    help="Torch device for the spectrogram transforms.",
)


@contextmanager
def stages(names: list[str]) -> Iterator[Callable[[str], None]]:
    """A progress bar over a command's stages (and over Griffin-Lim's iterations).

    Yields ``begin(name)``: the bar advances as each named stage begins; Griffin-Lim's
    iterations show on a second bar of their own while it runs.
    """
    with progress_bar() as progress:
        task = progress.add_task(names[0], total=len(names))
        iterations: TaskID | None = None
        done = -1

        def begin(name: str) -> None:
            nonlocal done
            done += 1
            progress.update(task, description=name, completed=done)

        def on_progress(stage: str, finished: int, total: int) -> None:
            nonlocal iterations
            if iterations is None:
                iterations = progress.add_task(stage, total=total)
            progress.update(iterations, completed=finished, total=total)

        with listening_to(on_progress):
            yield begin
        progress.update(task, completed=len(names))


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
        raise ValueError(f"not a readable image file: {path}") from None
    return image


def prepare_audio(audio: Audio, stereo: bool | None) -> tuple[Audio, SpectrogramParams]:
    """Resample to the model's rate and pick the channel layout."""
    from riffusion.spectrogram import SpectrogramParams

    audio = resample(audio, DEFAULT_SAMPLE_RATE)
    if stereo is None:
        stereo = audio.channels >= 2
    audio = to_stereo(audio) if stereo else to_mono(audio)
    return audio, SpectrogramParams(stereo=stereo)


def save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=image.getexif())


def read_source(source: Path, max_duration_s: float | None) -> Audio:
    return read_audio(source, max_duration_s=max_duration_s, min_duration_s=MIN_SPECTROGRAM_AUDIO_S)


def convert_audio(audio: Audio, output: Path, stereo: bool | None, device: str) -> Image.Image:
    from riffusion.spectrogram import image_from_audio

    audio, params = prepare_audio(audio, stereo)
    image = image_from_audio(audio, params, device=device)
    save_image(image, output)
    return image


def check_image_output(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: spectrogram images are written as PNG; name it *.png")


@click.command("audio-to-image")
@click.argument("audio_file", type=click.Path(path_type=Path))
@click.argument("image_file", type=click.Path(dir_okay=False, path_type=Path))
@channels_option
@click.option("--max-duration", type=float, default=None, help="Refuse audio longer than this (s).")
@device_option
def audio_to_image(
    audio_file: Path,
    image_file: Path,
    stereo: bool | None,
    max_duration: float | None,
    device: str | None,
) -> None:
    """Convert AUDIO_FILE (wav/flac/ogg/mp3) to a spectrogram IMAGE_FILE (png, with EXIF).

    The audio is resampled to 44.1 kHz; one pixel column is 10 ms.
    """
    with friendly_errors(*EXPECTED_ERRORS):
        check_image_output(image_file)
        with stages(["reading the audio", "loading torch", "spectrogram"]) as begin:
            begin("reading the audio")
            audio = read_source(audio_file, max_duration)
            begin("loading torch")
            device = checked_device(device)
            begin("spectrogram")
            image = convert_audio(audio, image_file, stereo, device)
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
    image_file: Path, audio_file: Path, seed: int, normalize: bool, device: str | None
) -> None:
    """Reconstruct audio from a spectrogram IMAGE_FILE into AUDIO_FILE (format from suffix).

    Uses the image's EXIF spectrogram parameters (defaults when missing) and
    Griffin-Lim phase reconstruction.
    """
    with friendly_errors(*EXPECTED_ERRORS):
        format_for_path(audio_file)  # an unknown suffix fails now, not after the work
        image = load_image(image_file)
        with stages(["loading torch", "Griffin-Lim", "writing the audio"]) as begin:
            begin("loading torch")
            device = checked_device(device)
            import torch

            from riffusion.spectrogram import audio_from_image

            begin("Griffin-Lim")
            generator = torch.Generator().manual_seed(seed)
            audio = audio_from_image(image, device=device, generator=generator)
            begin("writing the audio")
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
    input_dir: Path,
    output_dir: Path,
    stereo: bool | None,
    max_duration: float | None,
    device: str | None,
) -> None:
    """Convert every audio file in INPUT_DIR to a spectrogram PNG in OUTPUT_DIR.

    A file that fails is reported and skipped; the exit code is 1 if any failed.
    """
    sources = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not sources:
        raise click.ClickException(
            f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {input_dir}"
        )
    failures: list[tuple[Path, str]] = []
    with progress_bar() as progress:
        task = progress.add_task("loading torch", total=len(sources))
        device = checked_device(device)
        for source in sources:
            progress.update(task, description=source.name)
            try:
                audio = read_source(source, max_duration)
                convert_audio(audio, output_dir / f"{source.stem}.png", stereo, device)
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
