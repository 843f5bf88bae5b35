"""Audio/spectrogram subcommands (no model needed)."""

from __future__ import annotations

from riffusion.cli import cli  # noqa: F401
