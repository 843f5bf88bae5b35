"""HTTP request/response models of the Riffusion API and the model-service payloads.

Plain pydantic (no BentoML imports) so clients, tests and the service share
one definition. Limits live in the field constraints: a request outside them
fails validation with the offending field named in the error.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from riffusion.audio import Audio
from riffusion.schemas import (
    ID_PATTERN,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MAX_WIDTH,
    MIN_STEPS,
    MIN_WIDTH,
    GenerationJob,
    NegativePromptText,
    PromptInput,
    PromptText,
    SchedulerName,
)
from riffusion.seed_images import ID_OR_EMPTY_PATTERN

AudioFormat = Literal["mp3", "wav", "flac", "ogg"]
AUDIO_MEDIA_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
}
# Text-to-audio durations: the image width limits at 10 ms per pixel.
MIN_DURATION_S = MIN_WIDTH / 100
MAX_DURATION_S = MAX_WIDTH / 100
MAX_INTERPOLATION_CLIPS = 16
# The web app steps alpha by 0.25 in floating point and rolls over only above
# 1 + 1e-3, so it sends values such as 1.0000000000000002: accepted and clamped.
ALPHA_TOLERANCE = 1e-3

_WEB_APP_EXAMPLE: Any = {
    "alpha": 0.75,
    "num_inference_steps": 50,
    "seed_image_id": "og_beat",
    "mask_image_id": None,
    "start": {"prompt": "church bells on sunday", "seed": 42, "denoising": 0.75, "guidance": 7.0},
    "end": {"prompt": "jazz with piano", "seed": 123, "denoising": 0.75, "guidance": 7.0},
}


def data_url(media_type: str, payload: bytes) -> str:
    """``data:<media type>;base64,<payload>`` as the web app expects."""
    return f"data:{media_type};base64,{base64.b64encode(payload).decode('ascii')}"


def decode_data_url(url: str) -> tuple[str, bytes]:
    """Inverse of :func:`data_url`: (media type, payload)."""
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError(f"not a base64 data URL: {url[:40]!r}")
    return header[len("data:") : -len(";base64")], base64.b64decode(payload)


# ---------------------------------------------------------------- public API


class RunInferenceRequest(BaseModel):
    """The riffusion web app's request: interpolate between two prompt inputs at ``alpha``."""

    # strict: JSON "5", true or "0.5" are not numbers here (see README, "Errors").
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"example": _WEB_APP_EXAMPLE}
    )

    alpha: float = Field(
        default=0.0,
        ge=-ALPHA_TOLERANCE,
        le=1.0 + ALPHA_TOLERANCE,
        description="Interpolation position: 0 = start, 1 = end "
        f"(values within {ALPHA_TOLERANCE:g} outside [0, 1] are clamped).",
    )
    num_inference_steps: int = Field(
        default=50, ge=MIN_STEPS, le=MAX_STEPS, description="Denoising steps."
    )
    seed_image_id: str = Field(
        default="og_beat",
        pattern=ID_PATTERN,
        description="Seed spectrogram (fixes tempo and key); see GET /seed_images.",
    )
    mask_image_id: str | None = Field(
        default=None,
        # "" is turned into None below; the spec must admit what is accepted.
        pattern=ID_OR_EMPTY_PATTERN,
        description="Optional mask: white regions are repainted, black regions kept; "
        'null or "" means no mask.',
    )
    start: PromptInput
    end: PromptInput | None = Field(
        default=None, description="Interpolation target; omitted means the start input."
    )

    @field_validator("alpha")
    @classmethod
    def _clamp_alpha(cls, alpha: float) -> float:
        return min(max(alpha, 0.0), 1.0)

    @field_validator("mask_image_id", mode="before")
    @classmethod
    def _empty_mask_is_none(cls, mask_image_id: Any) -> Any:
        # The web app sends "" for ?maskImageId=none; riffusion's server read it as no mask.
        return None if mask_image_id == "" else mask_image_id

    def to_job(self) -> GenerationJob:
        return GenerationJob(
            start=self.start,
            end=self.end,
            alpha=self.alpha,
            num_inference_steps=self.num_inference_steps,
            seed_image_id=self.seed_image_id,
            mask_image_id=self.mask_image_id,
        )


class RunInferenceResponse(BaseModel):
    """The web app's response: spectrogram JPEG and MP3 audio as data URLs."""

    image: str = Field(description="data:image/jpeg;base64,... spectrogram image")
    audio: str = Field(description="data:audio/mpeg;base64,... MP3 audio")
    duration_s: float = Field(description="Audio duration in seconds.")


class TextToAudioRequest(BaseModel):
    """Generate a clip from a prompt alone (no seed image)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "example": {"prompt": "lofi hip hop beat", "seed": 7, "duration_s": 5.12}
        },
    )

    prompt: PromptText = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="Text prompt."
    )
    negative_prompt: NegativePromptText | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    num_inference_steps: int = Field(default=50, ge=MIN_STEPS, le=MAX_STEPS)
    guidance: float = Field(default=7.0, ge=0.0, le=30.0)
    duration_s: float = Field(
        default=5.12,
        ge=MIN_DURATION_S,
        le=MAX_DURATION_S,
        description="Clip length; rounded to a multiple of 80 ms.",
    )
    format: AudioFormat = Field(default="mp3", description="Output audio format.")
    scheduler: SchedulerName | None = None


class AudioToAudioRequest(BaseModel):
    """Multipart form: an audio file re-imagined clip by clip, optionally towards an end prompt."""

    model_config = ConfigDict(extra="forbid")

    audio: Path = Field(description="WAV, FLAC, OGG or MP3 file.")
    prompt: PromptText = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: NegativePromptText | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    denoising: float = Field(
        default=0.5, ge=0.0, le=1.0, description="0.4-0.55 keeps the source recognisable."
    )
    guidance: float = Field(default=7.0, ge=0.0, le=30.0)
    num_inference_steps: int = Field(default=50, ge=MIN_STEPS, le=MAX_STEPS)
    end_prompt: PromptText | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="If given, alpha walks from 0 to 1 along the track towards this prompt.",
    )
    end_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    format: AudioFormat = "mp3"

    def start_input(self) -> PromptInput:
        return PromptInput(
            prompt=self.prompt,
            seed=self.seed,
            negative_prompt=self.negative_prompt,
            denoising=self.denoising,
            guidance=self.guidance,
        )

    def end_input(self) -> PromptInput | None:
        if self.end_prompt is None:
            return None
        return self.start_input().model_copy(
            update={
                "prompt": self.end_prompt,
                "seed": self.seed if self.end_seed is None else self.end_seed,
            }
        )


class InterpolateRequest(BaseModel):
    """N clips walking alpha from 0 to 1 between two prompt inputs, stitched into one file."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "example": {
                "start": {"prompt": "church bells", "seed": 1},
                "end": {"prompt": "jazz piano", "seed": 2},
                "num_clips": 4,
                "seed_image_id": "og_beat",
            }
        },
    )

    start: PromptInput
    end: PromptInput
    num_clips: int = Field(default=5, ge=2, le=MAX_INTERPOLATION_CLIPS)
    num_inference_steps: int = Field(default=50, ge=MIN_STEPS, le=MAX_STEPS)
    seed_image_id: str = Field(default="og_beat", pattern=ID_PATTERN)
    mask_image_id: str | None = Field(default=None, pattern=ID_PATTERN)
    format: AudioFormat = "mp3"


class ClipImage(BaseModel):
    alpha: float
    image: str = Field(description="data:image/png;base64,... spectrogram (EXIF tagged)")


class InterpolateResponse(BaseModel):
    audio: str = Field(description="data:<audio type>;base64,... stitched audio")
    format: AudioFormat
    duration_s: float
    clips: list[ClipImage]


class SeedImageModel(BaseModel):
    id: str
    kind: Literal["seed", "mask"]
    tempo_bpm: float | None
    description: str


class SeedImageList(BaseModel):
    seed_images: list[SeedImageModel]


class ModelInfo(BaseModel):
    """GET /model_info: the checkpoint the model service loaded."""

    model_config = ConfigDict(extra="allow")

    model_id: str
    is_tiny: bool
    note: str
    device: str
    dtype: str
    unet_backend: str
    warm_up_s: float = Field(
        default=0.0, description="Seconds of the one-step clip generated at start-up, before ready."
    )


# ------------------------------------------------- API service <-> model service


class ModelRequest(BaseModel):
    """One job sent to the model service, stamped so the queue wait can be measured."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    job: GenerationJob
    submitted_at: float = Field(description="time.time() when the API service sent it.")
    job_id: str = Field(default="", description="The API service's id, for cancelling the job.")
    timeout_s: float | None = Field(
        default=None, ge=0, description="Seconds left to answer it (the engine's deadline)."
    )


class ModelResult(BaseModel):
    """One generated clip: lossless PNG and the exact float32 samples."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    image_png: bytes
    samples_f32: bytes = Field(description="float32 little-endian, (channels, frames) order")
    channels: int
    sample_rate: int
    timings: dict[str, float] = Field(default_factory=dict)
    batch_size: int = 1

    @classmethod
    def from_parts(
        cls, image_png: bytes, audio: Audio, timings: dict[str, float], batch_size: int
    ) -> ModelResult:
        samples = np.ascontiguousarray(audio.samples, dtype="<f4")
        return cls(
            image_png=image_png,
            samples_f32=samples.tobytes(),
            channels=audio.channels,
            sample_rate=audio.sample_rate,
            timings=timings,
            batch_size=batch_size,
        )

    def audio(self) -> Audio:
        flat = np.frombuffer(self.samples_f32, dtype="<f4")
        return Audio(samples=flat.reshape(self.channels, -1).copy(), sample_rate=self.sample_rate)


# ------------------------------------------------------------------ settings


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


class ServiceSettings(BaseModel):
    """Service configuration, read from ``RIFFUSION_*`` environment variables."""

    model: str = "riffusion/riffusion-model-v1"
    # The hub checkpoint's commit (40 hex digits): `bentoml build` refuses a hub id without it.
    model_revision: str | None = None
    # The tiny model on a CUDA device is a mistake (a tiny Bento without its ConfigMap)
    # unless asked for: the model service refuses to start otherwise.
    allow_tiny_on_gpu: bool = False
    unet_backend: Literal["eager", "traced", "compiled"] = "eager"
    device: str | None = None
    max_batch_size: int = Field(default=8, ge=1)
    max_latency_ms: int = Field(default=60_000, ge=1)
    api_key: str | None = None
    # "required": a missing RIFFUSION_API_KEY is a start-up error (the Bento's default);
    # "optional": the key turns auth on when set (a source checkout's default).
    auth: Literal["required", "optional"] = "optional"
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_upload_duration_s: float = Field(default=120.0, gt=0)
    max_concurrency: int = Field(default=32, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    batching: Literal["continuous", "adaptive", "off"] = "continuous"
    # Engine post-processing: "thread" overlaps it with the next steps, "inline" runs it
    # between steps; None picks by device (see riffusion.engine.default_postprocess).
    postprocess: Literal["thread", "inline"] | None = None
    shutdown_grace_s: float = Field(default=30.0, gt=0)
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    liveness_grace_s: float = Field(default=90.0, gt=0)
    # A connection that has not finished its request headers in this time is closed, and
    # past this many open connections the longest-waiting one is (serving.connection_limits).
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=512, ge=1)

    @classmethod
    def from_env(cls) -> ServiceSettings:
        env = os.environ
        return cls(
            model=env.get("RIFFUSION_MODEL") or "riffusion/riffusion-model-v1",
            model_revision=env.get("RIFFUSION_MODEL_REVISION") or None,
            allow_tiny_on_gpu=(env.get("RIFFUSION_ALLOW_TINY_ON_GPU") or "").strip().lower()
            in {"1", "true", "yes", "on"},
            unet_backend=cast(Any, env.get("RIFFUSION_UNET_BACKEND") or "eager"),
            device=env.get("RIFFUSION_DEVICE") or None,
            max_batch_size=_env_int("RIFFUSION_MAX_BATCH_SIZE", 8),
            max_latency_ms=_env_int("RIFFUSION_MAX_LATENCY_MS", 60_000),
            api_key=env.get("RIFFUSION_API_KEY") or None,
            auth=cast(Any, env.get("RIFFUSION_AUTH") or "optional"),
            max_upload_bytes=int(_env_float("RIFFUSION_MAX_UPLOAD_MB", 20.0) * 1024 * 1024),
            max_upload_duration_s=_env_float("RIFFUSION_MAX_UPLOAD_SECONDS", 120.0),
            max_concurrency=_env_int("RIFFUSION_MAX_CONCURRENCY", 32),
            request_timeout_s=_env_float("RIFFUSION_REQUEST_TIMEOUT_S", 300.0),
            liveness_grace_s=_env_float("RIFFUSION_LIVENESS_GRACE_S", 90.0),
            header_timeout_s=_env_float("RIFFUSION_HEADER_TIMEOUT_S", 10.0),
            max_connections=_env_int("RIFFUSION_MAX_CONNECTIONS", 512),
            batching=cast(Any, env.get("RIFFUSION_BATCHING") or "continuous"),
            postprocess=cast(Any, env.get("RIFFUSION_POSTPROCESS") or None),
            shutdown_grace_s=_env_float("RIFFUSION_SHUTDOWN_GRACE_S", 30.0),
            cors_origins=[
                origin.strip()
                for origin in (env.get("RIFFUSION_CORS_ORIGINS") or "*").split(",")
                if origin.strip()
            ],
        )

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
