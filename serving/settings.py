"""The service's configuration: ``RIFFUSION_*`` environment variables, defaults written once.

Read when service.py is imported, which is a worker's start-up (BentoML's service
decorators take the traffic limits and batching from it); the ``riffusion`` library
reads no environment at import. An empty variable means its default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from riffusion.contracts import PostProcessMode, UNetBackend

# continuous: the real-time engine, jobs join the running batch at any step;
# adaptive: BentoML's adaptive batching gathers calls into a batch for the engine;
# off: the engine with a running batch of one (one clip at a time).
BatchingMode = Literal["continuous", "adaptive", "off"]


def default_batching(denoise_together: bool) -> BatchingMode:
    """The mode when RIFFUSION_BATCHING is unset: the device policy's (continuous on a
    GPU, off on a CPU: riffusion.device_policy)."""
    return "continuous" if denoise_together else "off"


def engine_batch_size(batching: BatchingMode, max_batch_size: int) -> int:
    """Jobs per denoising step: ``off`` is the engine with a running batch of one;
    BentoML's adaptive batching needs room for two."""
    return {"off": 1, "adaptive": max(2, max_batch_size)}.get(batching, max_batch_size)


class ServiceSettings(BaseSettings):
    """Service configuration (README, "Configuration", documents each variable)."""

    model_config = SettingsConfigDict(
        env_prefix="RIFFUSION_", env_ignore_empty=True, populate_by_name=True, frozen=True
    )

    model: str = "riffusion/riffusion-model-v1"
    # The hub checkpoint's commit (40 hex digits): `bentoml build` refuses a hub id without it.
    model_revision: str | None = None
    # The tiny model on a CUDA device is a mistake (a tiny Bento without its ConfigMap)
    # unless asked for: the model service refuses to start otherwise.
    allow_tiny_on_gpu: bool = False
    unet_backend: UNetBackend = "eager"
    # Benchmarks only: the model service's compute takes an A10G's or H100's time, or none
    # ("zero"), with the tiny model (riffusion/emulation.py). Refused in a Bento unless
    # RIFFUSION_ALLOW_EMULATION=1.
    emulate: Literal["a10g", "h100", "zero"] | None = None
    allow_emulation: bool = False
    device: str | None = None
    # None: the device policy picks (default_batching).
    batching: BatchingMode | None = None
    max_batch_size: int = Field(default=8, ge=1)
    # Adaptive batching only: how long BentoML may hold a call to fill a batch.
    max_latency_ms: int = Field(default=60_000, ge=1)
    # None: the pipeline's device policy picks (riffusion.device_policy).
    postprocess: PostProcessMode | None = None
    api_key: str | None = None
    # "required": a missing RIFFUSION_API_KEY is a start-up error (the Bento's default);
    # "optional": the key turns auth on when set (a source checkout's default).
    auth: Literal["required", "optional"] = "optional"
    max_upload_mb: float = Field(default=20.0, gt=0)
    max_upload_duration_s: float = Field(
        default=120.0,
        gt=0,
        validation_alias=AliasChoices("RIFFUSION_MAX_UPLOAD_SECONDS", "max_upload_duration_s"),
    )
    max_concurrency: int = Field(default=32, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, gt=0)
    liveness_grace_s: float = Field(default=90.0, gt=0)
    # A connection that has not finished its request headers in this time is closed, and
    # past this many open connections the longest-waiting one is (serving.connection_limits).
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=512, ge=1)
    # Listener sessions (docs/sessions.md): audio generated ahead of each listener at most,
    # the margin before their buffer runs dry that a clip is due, the busy fraction of the
    # device up to which listeners are admitted, and an optional cap on their number.
    session_lookahead_s: float = Field(default=10.24, gt=0)
    session_margin_s: float = Field(default=1.0, ge=0)
    session_utilization: float = Field(default=0.8, gt=0, le=1)
    session_max_listeners: int | None = Field(default=None, ge=0)
    # "predict" (default): admit while the engine predicts real time for all; "cap": the
    # cap above alone decides (a device shared with other work, whose step times mislead).
    session_admission: Literal["predict", "cap"] = "predict"
    # Comma-separated in the environment.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()] or ["*"]
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def is_hub_model(self) -> bool:
        """A hub id (``owner/name``), as opposed to ``tiny``, a local directory or a store tag."""
        return (
            self.model != "tiny"
            and not self.is_store_model
            and not Path(self.model).expanduser().exists()
        )

    @property
    def is_store_model(self) -> bool:
        """A BentoML model-store tag (``name:version``, no slash): a checkpoint the Bento packs."""
        return (
            re.fullmatch(r"[a-z0-9][a-z0-9_.-]*:[a-z0-9_.-]+", self.model) is not None
            and not Path(self.model).expanduser().exists()
        )
