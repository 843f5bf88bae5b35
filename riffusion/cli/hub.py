"""A quick look at ``--model`` before a CLI command imports torch and loads a checkpoint.

A directory that does not exist, or a hub checkpoint that is not cached on an offline
machine, is reported in one line at once, before the 20-40 s of heavy imports. Without
the hub check an offline machine also spends about 25 s in the hub client's retries
and then reports a missing ``scheduler_config.json``. One request with a short
timeout tells "unreachable" apart at once: a cached checkpoint is then loaded
from the cache, otherwise the command stops with one line saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from riffusion.model_source import (
    HUB_ID_RE,
    MODEL_ENV_VAR,
    TINY_MODEL_ID,
    ModelLoadError,
    hub_offline,
    missing_directory_error,
)

PROBE_TIMEOUT_S = 5.0
# A file every diffusers checkpoint has: its presence in the cache means the model was fetched.
CACHE_MARKER = "scheduler/scheduler_config.json"


def hub_unreachable_reason() -> str | None:
    """Why the hub endpoint cannot be reached (one request, no retries), or None if it can."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # any transport failure (DNS, refused, TLS, timeout, proxy)
        text = str(error).strip()
        return f"{constants.ENDPOINT}: {text.splitlines()[0] if text else type(error).__name__}"
    return None


def is_cached(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, CACHE_MARKER), str)


def prepare_hub_model(model: str) -> str | None:
    """Check ``model`` before loading; returns a note to show the user, if any.

    A path that is no directory: raises ModelLoadError. A hub id offline (HF_HUB_OFFLINE
    or unreachable) and cached: loads from the cache (HF_HUB_OFFLINE=1); not cached:
    raises ModelLoadError naming the fixes.
    """
    if model == TINY_MODEL_ID or Path(model).expanduser().is_dir():
        return None
    if Path(model).expanduser().exists() or not HUB_ID_RE.match(model):
        raise missing_directory_error(model)
    if hub_offline():
        if is_cached(model):
            return None
        raise _not_cached(model, "HF_HUB_OFFLINE is set")
    reason = hub_unreachable_reason()
    if reason is None:
        return None
    if is_cached(model):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return f"the Hugging Face hub is unreachable ({reason}); using the cached {model}"
    raise _not_cached(model, f"the hub is unreachable ({reason})")


def _not_cached(model: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {model!r} is not in the Hugging Face cache and {why}; connect to the network "
        "once to download it, pass a local diffusers directory with --model, or use "
        f"--model tiny ({MODEL_ENV_VAR}=tiny) for an offline smoke run"
    )
