"""``riffusion print-exif``: reads only Pillow and the tag table, so it starts without torch."""

from __future__ import annotations

from pathlib import Path

import click
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.table import Table

from riffusion.exif import ExifTag, source_max_value


@click.command("print-exif")
@click.argument("image_file", type=click.Path(path_type=Path))
def print_exif(image_file: Path) -> None:
    """Print the spectrogram parameters stored in IMAGE_FILE's EXIF tags.

    Tag 11080 (the source clip's max) is shown as stored and, where the image holds
    the older [-1, 1] units, also in riffusion's units (samples scaled to int16).
    """
    try:
        with Image.open(image_file) as image:
            exif = image.getexif()
    except UnidentifiedImageError as error:
        raise click.ClickException(f"not a readable image file: {image_file}") from error
    except OSError as error:
        raise click.ClickException(str(error)) from error
    table = Table("tag", "name", "value")
    for tag in ExifTag:
        value = exif.get(tag.value)
        table.add_row(
            str(tag.value), tag.name.lower(), "(missing)" if value is None else str(value)
        )
    Console().print(table)
    if not any(tag.value in exif for tag in ExifTag):
        click.echo("no spectrogram EXIF tags: the default format would be assumed")
    stored, in_riffusion_units = exif.get(ExifTag.MAX_VALUE.value), source_max_value(exif)
    if in_riffusion_units is not None and in_riffusion_units != stored:
        click.echo(
            "max_value is in the older [-1, 1] units: "
            f"{in_riffusion_units:.6g} in riffusion's units"
        )
