"""The wire protocol: HTTP request/response models, the model-service payloads and errors.

Plain pydantic (no BentoML, no torch) so clients, tests and both services share one
definition, and the API service never loads torch. Limits live in the field
constraints: a request outside them fails validation with the offending field named
in the error. ``error_reply`` is the one table from a job's exception to its HTTP
status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from riffusion.audio import Audio
from riffusion.contracts import (
    EngineStopped,
    InvalidJobError,
    JobCancelled,
    JobExpired,
    JobFieldError,
    JobRefused,
)
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
from riffusion.seed_images import ID_OR_EMPTY_PATTERN, UnknownImageError

logger = logging.getLogger(__name__)

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
    """Inverse of :func:`data_url`: (media type, payload); ValueError saying what is wrong."""
    header, sep, payload = url.partition(",")
    if not header.startswith("data:"):
        raise ValueError(f"not a data URL: {url[:40]!r}")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"data URL is not base64: {header[:40]!r}")
    media_type = header[len("data:") : -len(";base64")]
    try:
        return media_type, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{media_type}: invalid base64 ({error})") from error


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
    step_calibration_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Milliseconds of a denoising step by jobs in it (one, and a full batch), "
        "measured at start-up: what deadlines and listener admission are priced from first.",
    )


# ------------------------------------------------- API service <-> model service


class ModelAudio(BaseModel):
    """Audio between the services: the exact float32 samples."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    samples_f32: bytes = Field(description="float32 little-endian, (channels, frames) order")
    channels: int
    sample_rate: int

    @staticmethod
    def fields_of(audio: Audio) -> dict[str, Any]:
        samples = np.ascontiguousarray(audio.samples, dtype="<f4")
        return {
            "samples_f32": samples.tobytes(),
            "channels": audio.channels,
            "sample_rate": audio.sample_rate,
        }

    @classmethod
    def from_audio(cls, audio: Audio) -> ModelAudio:
        return cls(**cls.fields_of(audio))

    def audio(self) -> Audio:
        flat = np.frombuffer(self.samples_f32, dtype="<f4")
        return Audio(samples=flat.reshape(self.channels, -1).copy(), sample_rate=self.sample_rate)


class ModelResult(ModelAudio):
    """One generated clip: lossless PNG and the exact float32 samples."""

    image_png: bytes
    timings: dict[str, float] = Field(default_factory=dict)
    batch_size: int = 1

    @classmethod
    def from_parts(
        cls, image_png: bytes, audio: Audio, timings: dict[str, float], batch_size: int
    ) -> ModelResult:
        return cls(
            image_png=image_png,
            timings=timings,
            batch_size=batch_size,
            **cls.fields_of(audio),
        )


class ModelError(BaseModel):
    """Why the model service did not produce a clip, as the HTTP answer the API should give."""

    status: int
    message: str
    retry_after_s: float | None = Field(default=None, description="for 503: when to retry")
    field: str | None = Field(
        default=None, description="the job field at fault, dotted (start.negative_prompt)"
    )


class ModelReply(BaseModel):
    """One job's answer: a clip or an error (never both)."""

    result: ModelResult | None = None
    error: ModelError | None = None


def error_reply(error: BaseException) -> ModelReply:
    """The reply for a job that raised ``error``: the one table from a job's exception to
    the HTTP answer (unexpected errors are logged, not echoed)."""
    if isinstance(error, JobRefused):
        return _reply(HTTPStatus.SERVICE_UNAVAILABLE, str(error), error.retry_after_s)
    if isinstance(error, EngineStopped):
        return _reply(HTTPStatus.SERVICE_UNAVAILABLE, str(error), 5.0)
    if isinstance(error, JobExpired):
        return _reply(HTTPStatus.GATEWAY_TIMEOUT, str(error))
    if isinstance(error, JobFieldError):
        return _reply(HTTPStatus.BAD_REQUEST, str(error), field=error.field)
    if isinstance(error, JobCancelled | asyncio.CancelledError):
        # Its caller is normally gone; one still waiting may retry.
        return _reply(HTTPStatus.SERVICE_UNAVAILABLE, "the clip was cancelled", 1.0)
    if isinstance(error, InvalidJobError | UnknownImageError | ValueError):
        return _reply(HTTPStatus.BAD_REQUEST, str(error))
    logger.error("job failed in the model service", exc_info=error)
    return _reply(HTTPStatus.INTERNAL_SERVER_ERROR, "the model service failed on this clip")


def _reply(
    status: int, message: str, retry_after_s: float | None = None, field: str | None = None
) -> ModelReply:
    return ModelReply(
        error=ModelError(status=status, message=message, retry_after_s=retry_after_s, field=field)
    )


class ModelRequest(BaseModel):
    """One job sent to the model service, stamped so the queue wait can be measured."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    job: GenerationJob
    submitted_at: float = Field(description="time.time() when the API service sent it.")
    job_id: str = Field(default="", description="The API service's id, for cancelling the job.")
    timeout_s: float | None = Field(
        default=None, ge=0, description="Seconds left to answer it (the engine's deadline)."
    )
    init_audio: ModelAudio | None = Field(
        default=None,
        description=(
            "Audio-to-audio: the source clip, whose spectrogram the model service makes "
            "into the job's init image (the API service never loads torch)."
        ),
    )
    due_s: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Seconds until the clip is due: a listener's buffer runs dry (with "
            "listener_id: served before every clip not a listener's), or a web-app "
            "clip has played."
        ),
    )
    listener_id: str | None = Field(
        default=None, max_length=64, description="The admitted listener this clip is for."
    )


class ListenerDecision(BaseModel):
    """The model service's answer to a listener asking for a place."""

    accepted: bool
    message: str
    retry_after_s: float | None = None
    listeners: int | None = Field(
        default=None,
        description="Listeners admitted after this decision (None: the model service not asked).",
    )
    load: float | None = Field(
        default=None,
        description="Predicted busy fraction of the device with the new one (None: not asked).",
    )
