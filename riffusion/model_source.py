"""Which model to load, and the error when it cannot be: names only, no torch.

Light on purpose: the CLI checks ``--model`` with these before it imports torch and
diffusers, so a model that cannot be loaded is reported at once, not after the
heavy imports (``riffusion.models`` loads it).
"""

from __future__ import annotations

import os
import re

DEFAULT_MODEL_ID = "riffusion/riffusion-model-v1"
TINY_MODEL_ID = "tiny"
MODEL_ENV_VAR = "RIFFUSION_MODEL"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names what is missing and how to fix it."""


def hub_offline() -> bool:
    """Read HF_HUB_OFFLINE at call time (the libraries read it once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def missing_directory_error(model: str) -> ModelLoadError:
    return ModelLoadError(
        f"model directory {model!r} does not exist (or is not a directory); give an "
        f"existing diffusers directory, a hub id such as {DEFAULT_MODEL_ID!r}, or 'tiny'"
    )
