"""Start-up refusals that keep a misconfigured pod from serving, each in one line.

- ``require_api_key``: with ``RIFFUSION_AUTH=required`` (the Bento's default) a
  missing ``RIFFUSION_API_KEY`` stops ``bentoml serve`` before it listens, instead
  of serving every route without auth.
- ``refuse_tiny_on_gpu``: the tiny test model (noise) on a CUDA device means a Bento
  built with ``RIFFUSION_MODEL=tiny`` reached a GPU pod without its model setting;
  the model service refuses to start (so never reports ready) unless
  ``RIFFUSION_ALLOW_TINY_ON_GPU=1`` asks for it.
- ``refuse_emulation_in_bento``: an emulated accelerator (``RIFFUSION_EMULATE``, for
  benchmarks) serves noise from the tiny model at a GPU's pace; in a Bento (a built
  or containerized deployment) the server stops before it listens unless
  ``RIFFUSION_ALLOW_EMULATION=1`` asks for it.

And the line that says the server is ready (``announce_when_ready``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from bentoml.exceptions import BentoMLException

# Under BentoML's logger: its handler prints INFO lines in the server log (the root
# logger, and so "riffusion.*", stays at WARNING under `bentoml serve`).
logger = logging.getLogger("bentoml.riffusion")
READY_POLL_S = 0.5


class StartupRefused(BentoMLException):
    """A configuration error the BentoML CLI prints as one line (a BentoMLException)."""


def require_api_key(auth: str, api_key: str | None) -> None:
    if auth == "required" and not api_key:
        raise StartupRefused(
            "RIFFUSION_AUTH=required but RIFFUSION_API_KEY is empty: set the key (e.g. from "
            "the riffusion-api-key Secret), or set RIFFUSION_AUTH=optional to serve without "
            "auth on purpose"
        )


def refuse_tiny_on_gpu(description: dict[str, Any], allowed: bool) -> None:
    """``description``: ``RiffusionPipeline.describe()`` of the loaded model."""
    from riffusion.models import ModelLoadError  # model service only: torch

    device = str(description.get("device", ""))
    if description.get("is_tiny") and device.startswith("cuda") and not allowed:
        raise ModelLoadError(
            f"the tiny test model (noise, not music) was loaded on {device}: set "
            "RIFFUSION_MODEL to the checkpoint this GPU should serve, or "
            "RIFFUSION_ALLOW_TINY_ON_GPU=1 to serve the tiny model on purpose"
        )


def running_from_bento(service_file: str | Path) -> bool:
    """True when ``service_file`` (service.py) is served from a built Bento: a Bento keeps
    its sources in ``src/`` beside its ``bento.yaml``, in the store and in the image alike."""
    return (Path(service_file).resolve().parent.parent / "bento.yaml").is_file()


def refuse_emulation_in_bento(emulate: str | None, allowed: bool, in_bento: bool) -> None:
    if emulate and in_bento and not allowed:
        raise StartupRefused(
            f"RIFFUSION_EMULATE={emulate} in a Bento: an emulated accelerator is for "
            "benchmarks (the tiny model, timed as a GPU), never for serving; unset "
            "RIFFUSION_EMULATE, or set RIFFUSION_ALLOW_EMULATION=1 to run it on purpose"
        )


async def announce_when_ready(
    is_ready: Callable[[], Awaitable[bool]], describe: Callable[[], Awaitable[dict[str, Any]]]
) -> None:
    """Log one line once the model service is ready: from then on /readyz answers 200.

    Runs as a task of the API worker; the time is counted from the start of
    ``bentoml serve`` (the worker's parent), so it includes the model load and warm-up.
    """
    while True:
        with contextlib.suppress(Exception):  # the model client is set up after start-up hooks
            if await is_ready():
                break
        await asyncio.sleep(READY_POLL_S)
    started = psutil.Process(os.getppid()).create_time()
    try:
        info = await describe()
    except Exception:  # a description is a nicety: the line must still be logged
        info = {}
    logger.info(
        "Riffusion ready: model %s on %s (%s), %.1f s after bentoml serve started",
        info.get("model_id", "?"),
        info.get("device", "?"),
        info.get("dtype", "?"),
        time.time() - started,
    )
