"""Subcommands that run the diffusion model."""

from __future__ import annotations

from riffusion.cli import cli  # noqa: F401
