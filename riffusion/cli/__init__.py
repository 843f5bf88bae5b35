"""The ``riffusion`` command line: audio tools and model commands."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="riffusion-serving")
def cli() -> None:
    """Riffusion: spectrogram audio tools and text/audio-to-music generation."""


def main() -> None:
    # Command modules attach themselves to ``cli`` on import.
    from riffusion.cli import audio_commands, model_commands, trace_commands  # noqa: F401

    cli()
