"""``riffusion seed-images`` and ``make-seed-images``: list and (re)make the seed-image library.

Listing needs neither numpy nor torch; the synthesiser is imported only when
``make-seed-images`` runs.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from riffusion.cli.errors import friendly_errors
from riffusion.seed_images import SeedImageError, SeedImageLibrary


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
    with friendly_errors(SeedImageError, OSError):
        library = SeedImageLibrary(directory)
    table = Table("id", "kind", "tempo (bpm)", "description", title=str(library.directory))
    for info in library.list(kind):
        tempo = "" if info.tempo_bpm is None else f"{info.tempo_bpm:g}"
        table.add_row(info.id, info.kind, tempo, info.description)
    Console(width=160).print(table)


@click.command("make-seed-images")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def make_seed_images(directory: Path) -> None:
    """(Re)generate the seed and mask images plus manifest.json in DIRECTORY (deterministic)."""
    # numpy, torch and the loop synthesiser: imported here so that listing starts without them.
    from riffusion.seed_image_synthesis import generate_library

    with friendly_errors(SeedImageError, OSError):
        infos = generate_library(directory)
    seeds = sum(info.kind == "seed" for info in infos)
    click.echo(f"wrote {seeds} seed and {len(infos) - seeds} mask images to {directory}")
