"""Typed generation jobs shared by the pipeline, the CLI and the service.

One ``GenerationJob`` describes one clip. Riffusion's "riffuse" (start/end
prompt inputs interpolated at ``alpha`` on a seed image) and text-to-audio
(no seed image; width from the requested duration) are the same job type, so
the pipeline can batch any mix of them.
"""

from __future__ import annotations

import unicodedata
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from riffusion.prompt_syntax import check_prompt_length
from riffusion.seed_images import ID_PATTERN

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1
MIN_STEPS, MAX_STEPS = 1, 150
MAX_GUIDANCE = 30.0
# Latent width must be a whole number of latent pixels: 8 image pixels each.
WIDTH_MULTIPLE = 8
MIN_WIDTH, MAX_WIDTH = 64, 2048
DEFAULT_WIDTH = 512
HEIGHT = 512  # one row per mel bin
# The spectrogram format's sample rate and hop (riffusion.spectrogram.SpectrogramParams'
# defaults), for code that must not load torch.
SAMPLE_RATE = 44100
STEP_SIZE_MS = 10


def lerp_float(start: float, end: float, alpha: float) -> float:
    """``start`` to ``end`` at ``alpha``, exact at both ends."""
    if alpha == 0.0:
        return start
    if alpha == 1.0:
        return end
    return start * (1.0 - alpha) + end * alpha


def img2img_steps(num_inference_steps: int, denoising: float) -> int:
    """Steps an img2img job runs: the last ``int(steps * denoising)`` of its schedule."""
    return min(int(num_inference_steps * denoising), num_inference_steps)


# Unicode categories a reader can see: letters, numbers, punctuation, symbols. Spaces
# (Z*), control and format characters (Cc, Cf: NUL, zero-width space, BOM) and marks
# with no base (M*: a combining grapheme joiner) are not a prompt.
_VISIBLE_CATEGORIES = frozenset("LNPS")


def _not_blank(text: str) -> str:
    if not any(unicodedata.category(char)[0] in _VISIBLE_CATEGORIES for char in text):
        raise ValueError("must contain a visible character, not only spaces or control characters")
    return text


# Checked where the text arrives, so an error names the field and never reaches a batch.
PromptText = Annotated[str, AfterValidator(_not_blank), AfterValidator(check_prompt_length)]
NegativePromptText = Annotated[str, AfterValidator(check_prompt_length)]


class SchedulerName(StrEnum):
    """Diffusion schedulers a job may ask for (default: the checkpoint's own)."""

    ddim = "ddim"
    pndm = "pndm"
    dpm_multistep = "dpm_multistep"
    euler = "euler"
    euler_ancestral = "euler_ancestral"
    lms = "lms"


class PromptInput(BaseModel):
    """One end of an interpolation: text, seed and how strongly to follow them."""

    # strict: JSON "5", true or "0.5" are not numbers here.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: PromptText = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What the music should sound like. Supports (word:1.3), (word), [word].",
        examples=["church bells on sunday"],
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Noise seed.", examples=[42])
    negative_prompt: NegativePromptText | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="What to steer away from (the unconditional branch of guidance).",
    )
    denoising: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="How far from the seed image to move: 0 keeps it, 1 ignores it.",
    )
    guidance: float = Field(
        default=7.0, ge=0.0, le=MAX_GUIDANCE, description="Classifier-free guidance scale."
    )


class GenerationJob(BaseModel):
    """One clip to generate.

    - riffuse: ``start`` (+ optional ``end`` and ``alpha``) on a seed image
      given by ``seed_image_id`` or by ``init_image_png`` (audio-to-audio);
    - text-to-audio: no seed image; the clip is ``width`` pixels (10 ms each) wide.
    """

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    start: PromptInput
    end: PromptInput | None = Field(
        default=None, description="Interpolation target; None means the start input alone."
    )
    alpha: float = Field(default=0.0, ge=0.0, le=1.0, description="0 = start, 1 = end.")
    num_inference_steps: int = Field(default=50, ge=MIN_STEPS, le=MAX_STEPS)
    seed_image_id: str | None = Field(default=None, pattern=ID_PATTERN)
    init_image_png: bytes | None = Field(
        default=None, description="A spectrogram image (PNG) to start from instead of an id."
    )
    mask_image_id: str | None = Field(default=None, pattern=ID_PATTERN)
    width: int = Field(
        default=DEFAULT_WIDTH,
        ge=MIN_WIDTH,
        le=MAX_WIDTH,
        multiple_of=WIDTH_MULTIPLE,
        description="Image width in pixels for text-to-audio (ignored when a seed image is given).",
    )
    scheduler: SchedulerName | None = Field(
        default=None, description="Scheduler; default is the checkpoint's own."
    )

    @model_validator(mode="after")
    def _check_images(self) -> GenerationJob:
        if self.seed_image_id is not None and self.init_image_png is not None:
            raise ValueError("give seed_image_id or init_image_png, not both")
        if self.mask_image_id is not None and not self.is_img2img:
            raise ValueError("mask_image_id needs a seed image")
        return self

    @property
    def is_img2img(self) -> bool:
        return self.seed_image_id is not None or self.init_image_png is not None

    @property
    def end_or_start(self) -> PromptInput:
        return self.end if self.end is not None else self.start

    # --- the job's plan: what the pipeline, the engine and its predictions all use ---

    @property
    def effective_alpha(self) -> float:
        """Without an end input the job is the start input alone, whatever alpha says."""
        return self.alpha if self.end is not None else 0.0

    @property
    def img2img_denoising(self) -> float | None:
        """Denoising strength lerped at the effective alpha; None without a seed image."""
        if not self.is_img2img:
            return None
        return lerp_float(self.start.denoising, self.end_or_start.denoising, self.effective_alpha)

    @property
    def num_steps(self) -> int:
        """Denoising steps the job runs (img2img runs the last ``steps * denoising``)."""
        denoising = self.img2img_denoising
        if denoising is None:
            return self.num_inference_steps
        return img2img_steps(self.num_inference_steps, denoising)

    def latent_size(self, vae_scale_factor: int, image_width: int | None = None) -> tuple[int, int]:
        """(height, width) of the job's latents: the seed image's width when known (one
        is assumed ``DEFAULT_WIDTH`` wide before it is read), else ``width``."""
        if image_width is None:
            image_width = DEFAULT_WIDTH if self.is_img2img else self.width
        return HEIGHT // vae_scale_factor, image_width // vae_scale_factor


def width_for_duration(duration_s: float, step_size_ms: int = STEP_SIZE_MS) -> int:
    """Image width (pixels, multiple of 8, within limits) for a clip of ``duration_s``."""
    pixels = round(duration_s * 1000 / step_size_ms / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    return max(MIN_WIDTH, min(MAX_WIDTH, pixels))
