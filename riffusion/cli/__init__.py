"""The ``riffusion`` command line: audio tools and model commands.

Commands are imported only when they run, from modules grouped by what they
need: ``--help``, ``print-exif``, ``seed-images`` and ``sample-clips`` start
without torch, the spectrogram commands import torch and torchaudio but
nothing of the model, and only the generation commands import diffusers and
transformers (``tests/test_cli_startup.py``). ``--help`` lists the commands
from :data:`COMMANDS`' summaries (a test keeps them equal to the commands' own).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import click


class LazyCommand(NamedTuple):
    module: str
    attribute: str
    summary: str  # the command's own short help (first line of its docstring)


_AUDIO = "riffusion.cli.audio_commands"
_SEEDS = "riffusion.cli.seed_commands"
_MODEL = "riffusion.cli.model_commands"
COMMANDS: dict[str, LazyCommand] = {
    "audio-to-image": LazyCommand(
        _AUDIO,
        "audio_to_image",
        "Convert AUDIO_FILE (wav/flac/ogg/mp3) to a spectrogram IMAGE_FILE (png, with EXIF).",
    ),
    "audio-to-images": LazyCommand(
        _AUDIO,
        "audio_to_images",
        "Convert every audio file in INPUT_DIR to a spectrogram PNG in OUTPUT_DIR.",
    ),
    "image-to-audio": LazyCommand(
        _AUDIO,
        "image_to_audio",
        "Reconstruct audio from a spectrogram IMAGE_FILE into AUDIO_FILE (format from suffix).",
    ),
    "interpolate": LazyCommand(
        _MODEL,
        "interpolate",
        "Walk from a start to an end prompt in NUM_CLIPS clips on one seed image, stitched.",
    ),
    "make-seed-images": LazyCommand(
        _SEEDS,
        "make_seed_images",
        "(Re)generate the seed and mask images plus manifest.json in DIRECTORY (deterministic).",
    ),
    "print-exif": LazyCommand(
        "riffusion.cli.exif_command",
        "print_exif",
        "Print the spectrogram parameters stored in IMAGE_FILE's EXIF tags.",
    ),
    "riff": LazyCommand(
        _MODEL,
        "riff",
        "Riff on an audio file of any length: overlapping clips re-imagined, then crossfaded.",
    ),
    "sample-clips": LazyCommand(
        "riffusion.cli.clips_command",
        "sample_clips",
        "Cut NUM_CLIPS clips of DURATION seconds from AUDIO_FILE into OUTPUT_DIR.",
    ),
    "seed-images": LazyCommand(
        _SEEDS, "seed_images", "List the seed and mask images available by id."
    ),
    "text-to-audio": LazyCommand(
        _MODEL, "text_to_audio", "Generate a clip from a text PROMPT (no seed image)."
    ),
    "trace-unet": LazyCommand(
        "riffusion.cli.trace_commands",
        "trace_unet_command",
        "Trace the UNet (any batch size, per-sample timesteps) and verify it against eager.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (see the module docstring)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        lazy = COMMANDS.get(cmd_name)
        if lazy is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module(lazy.module), lazy.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{lazy.module}.{lazy.attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        # Click's own layout, from the summaries instead of the imported commands.
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [
            (name, click.Command(name, help=COMMANDS[name].summary).get_short_help_str(limit))
            for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="riffusion-serving")
def cli() -> None:
    """Riffusion: spectrogram audio tools and text/audio-to-music generation.

    Generation commands use the model in $RIFFUSION_MODEL (or --model): a hub id,
    a local diffusers directory, or 'tiny' (random weights, offline smoke runs).
    """


def main() -> None:
    cli()
