"""Audio encoding and decoding through libsndfile: a Python file object against a file
libsndfile reaches on its own (a descriptor or a path), alone and beside a busy thread.

Every web-app clip leaves the API service as an MP3, encoded on a worker thread while
the event loop runs Python; uploads are decoded the same way. Given a Python file object
(``io.BytesIO``, an open upload), libsndfile calls back into Python for every chunk it
reads or writes, and each callback must take the GIL back from whichever thread holds
it: up to the interpreter's switch interval (5 ms) each time another thread is busy.
Given a descriptor or a path, libsndfile does its own I/O and the whole call runs
without the GIL. This times both ways, alone and beside a thread spinning in Python
(the event loop's stand-in), on a clip decoded from a seed image (a real spectrogram's
audio, 5.12 s at 44.1 kHz, as generated clips are), and checks that both ways decode to
the same samples (Vorbis streams differ in their random serial number, so not bytes).

    uv run --frozen --all-extras python -m bench.bench_audio_io
"""

from __future__ import annotations

import io
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
import numpy as np
import soundfile as sf
from rich.console import Console
from rich.table import Table

from bench.timing import median_ms
from riffusion.audio import _ENCODING, Audio, encode_audio, read_audio

console = Console()
# libsndfile's (container, subtype, compression level) per format: encode_audio's own.
FORMATS = _ENCODING


def clip_from_seed_image(path: Path) -> Audio:
    """The seed image's audio (Griffin-Lim on the CPU), as the pipeline makes a clip's."""
    import torch
    from PIL import Image

    from riffusion.spectrogram import audio_from_image

    with Image.open(path) as image:
        return audio_from_image(image, generator=torch.Generator().manual_seed(0))


def encode_via_file_object(audio: Audio, fmt: str) -> bytes:
    """libsndfile writing through Python callbacks (what ``io.BytesIO`` gives)."""
    container, subtype, level = FORMATS[fmt]
    buffer = io.BytesIO()
    sf.write(
        buffer,
        np.clip(audio.samples, -1.0, 1.0).T,
        audio.sample_rate,
        format=container,
        subtype=subtype,
        compression_level=level,
    )
    return buffer.getvalue()


def decode_via_file_object(path: Path) -> np.ndarray:
    with path.open("rb") as handle:
        return read_audio(handle).samples


def decode_via_path(path: Path) -> np.ndarray:
    return read_audio(path).samples


@contextmanager
def busy_thread() -> Iterator[None]:
    """A thread running Python the whole time (an event loop under load)."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@click.command()
@click.option(
    "--seed-image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=Path("seed_images/agile.png"),
    show_default=True,
)
@click.option("--formats", default="mp3,ogg,flac,wav", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
def main(seed_image: Path, formats: str, repeats: int) -> None:
    """Milliseconds per clip, each way, alone and beside a busy Python thread."""
    audio = clip_from_seed_image(seed_image)
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = sorted(set(wanted) - set(FORMATS))
    if unknown:
        raise click.BadParameter(f"unknown formats {unknown}; choose from {sorted(FORMATS)}")
    table = Table(
        title=f"{audio.duration_s:.2f} s, {audio.channels} ch, {audio.sample_rate} Hz clip "
        f"from {seed_image}; median of {repeats}"
    )
    for column in ("work", "file object: ms", "descriptor/path: ms", "ratio", "same result"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch_dir:
        for fmt in wanted:
            _compare(table, audio, fmt, Path(scratch_dir), repeats)
    console.print(table)


def _compare(table: Table, audio: Audio, fmt: str, scratch: Path, repeats: int) -> None:
    """Four rows of ``table``: ``fmt`` encoded and decoded each way, alone and busy."""
    theirs, ours = scratch / f"file-object.{fmt}", scratch / f"descriptor.{fmt}"
    theirs.write_bytes(encode_via_file_object(audio, fmt))
    ours.write_bytes(encode_audio(audio, fmt))
    # Vorbis streams carry a random serial number: compare what decodes, not bytes.
    encoded_same = np.array_equal(decode_via_path(theirs), decode_via_path(ours))
    decoded_same = np.array_equal(decode_via_file_object(ours), decode_via_path(ours))
    work = {
        "encode": (lambda: encode_via_file_object(audio, fmt), lambda: encode_audio(audio, fmt)),
        "decode": (lambda: decode_via_file_object(ours), lambda: decode_via_path(ours)),
    }
    for busy in (False, True):
        for kind, (slow_call, fast_call) in work.items():
            with busy_thread() if busy else nullcontext():
                slow, fast = median_ms(slow_call, repeats), median_ms(fast_call, repeats)
            same = encoded_same if kind == "encode" else decoded_same
            table.add_row(
                f"{kind} {fmt}{', busy thread' if busy else ''}",
                f"{slow:.1f}",
                f"{fast:.1f}",
                f"{fast / slow:.2f}x",
                "samples" if same else "NO",
            )


if __name__ == "__main__":
    main()
