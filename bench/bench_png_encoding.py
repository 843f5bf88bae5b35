"""PNG encoding of spectrograms: the zlib level the model service encodes every clip at.

Every generated clip leaves the model service as a lossless PNG (``encode_image``), made
on its CPU beside the engine. This times each zlib level on the seed images (512 px
spectrograms, as generated clips are) against Pillow's default (6), with the bytes each
gives, and checks that every level decodes to the same pixels.

    uv run --frozen --all-extras python -m bench.bench_png_encoding
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import click
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.timing import median_ms
from riffusion.spectrogram.image import PNG_COMPRESS_LEVEL

console = Console()
PILLOW_DEFAULT = 6


def encode(image: Image.Image, level: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


@click.command()
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=Path("seed_images"),
    show_default=True,
)
@click.option("--levels", default="1,3,6,9", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
def main(images: Path, levels: str, repeats: int) -> None:
    """Milliseconds and bytes per zlib level, summed over the images."""
    pictures = []
    for path in sorted(images.glob("*.png")):
        with Image.open(path) as opened:
            pictures.append(opened.convert("RGB"))
    if not pictures:
        raise click.ClickException(f"no PNG images in {images}")
    level_list = sorted({int(x) for x in levels.split(",") if x.strip()} | {PILLOW_DEFAULT})
    rows = {}
    for level in level_list:
        total_ms = 0.0
        for picture in pictures:
            total_ms += median_ms(functools.partial(encode, picture, level), repeats)
        total_bytes = 0
        for picture in pictures:
            data = encode(picture, level)
            total_bytes += len(data)
            with Image.open(io.BytesIO(data)) as decoded:
                if not np.array_equal(np.asarray(decoded), np.asarray(picture)):
                    raise click.ClickException(f"level {level} changed the pixels")
        rows[level] = (total_ms, total_bytes)
    base_ms, base_bytes = rows[PILLOW_DEFAULT]
    table = Table(title=f"{len(pictures)} images from {images}, median of {repeats} encodings")
    for column in ("zlib level", "ms per image", "vs level 6", "KiB per image", "size vs 6"):
        table.add_column(column, justify="right")
    for level, (ms, size) in rows.items():
        note = " (served)" if level == PNG_COMPRESS_LEVEL else ""
        table.add_row(
            f"{level}{note}",
            f"{ms / len(pictures):.1f}",
            f"{ms / base_ms:.2f}x",
            f"{size / len(pictures) / 1024:.0f}",
            f"{size / base_bytes:.2f}x",
        )
    console.print(table)


if __name__ == "__main__":
    main()
