"""A listener's endless jam: the riffusion web app's alpha walk, steered while it plays.

One ``JamWalk`` per listener turns the jam's settings into the next clip's job:

1. The walk starts on the listener's prompt and seed, heading for the same prompt
   with the next seed; each clip moves alpha by ``alpha_step`` (0.25: four clips per
   transition, as the web app does), every clip on the same seed image (tempo, key).
2. At alpha 1 the end becomes the start (it is the clip just heard) and the next
   transition heads for the target prompt with the next seed, alpha restarting one
   step in (alpha 0 of the new transition is the clip already heard).
3. ``steer`` changes the target (prompt, negative prompt, seed image, mask): the very
   next clip's end already carries the new prompt, keeping its seed, so the noise
   walk stays continuous while the text moves towards what the listener asked for.

The walk knows nothing of time or transport; ``riffusion.playback`` says when a
listener needs its next clip.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from riffusion.schemas import (
    ID_PATTERN,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MIN_STEPS,
    GenerationJob,
    NegativePromptText,
    PromptInput,
    PromptText,
)
from riffusion.seed_images import ID_OR_EMPTY_PATTERN

ALPHA_STEP = 0.25  # four clips per transition, like the riffusion web app
DEFAULT_SEED_IMAGE_ID = "og_beat"


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


class JamSettings(BaseModel):
    """What a listener asks to hear: the jam's prompt and how every clip is generated."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: PromptText = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What the music should sound like.",
        examples=["church bells on sunday"],
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Noise seed of the first clip.")
    negative_prompt: NegativePromptText | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to steer away from."
    )
    seed_image_id: str = Field(
        default=DEFAULT_SEED_IMAGE_ID,
        pattern=ID_PATTERN,
        description="Seed spectrogram (fixes tempo and key); see GET /seed_images.",
    )
    mask_image_id: str | None = Field(
        default=None, pattern=ID_OR_EMPTY_PATTERN, description='Optional mask; "" means none.'
    )
    num_inference_steps: int = Field(default=50, ge=MIN_STEPS, le=MAX_STEPS)
    denoising: float = Field(default=0.75, ge=0.0, le=1.0)
    guidance: float = Field(default=7.0, ge=0.0, le=MAX_GUIDANCE)

    _mask_empty = field_validator("mask_image_id", mode="before")(_empty_is_none)


class JamSteer(BaseModel):
    """What to hear next, sent while playing: a new prompt, and optionally a new image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: PromptText = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: NegativePromptText | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    seed_image_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="New seed image; omitted keeps the current."
    )
    mask_image_id: str | None = Field(
        default=None,
        pattern=ID_OR_EMPTY_PATTERN,
        description='New mask; omitted keeps the current, "" or null removes it.',
    )


class JamWalk:
    """The sequence of clip jobs for one listener; ``next_job`` per clip, ``steer`` any time."""

    def __init__(self, settings: JamSettings, alpha_step: float = ALPHA_STEP) -> None:
        if not 0 < alpha_step <= 1:
            raise ValueError(f"alpha_step must be in (0, 1], got {alpha_step}")
        self.settings = settings
        self.alpha_step = alpha_step
        self.start = self._input(settings.prompt, settings.seed)
        self.end = self._input(settings.prompt, _next_seed(settings.seed))
        self.alpha = 0.0
        self.clips = 0  # jobs handed out so far

    def _input(self, prompt: str, seed: int) -> PromptInput:
        return PromptInput(
            prompt=prompt,
            seed=seed,
            negative_prompt=self.settings.negative_prompt,
            denoising=self.settings.denoising,
            guidance=self.settings.guidance,
        )

    def next_job(self) -> GenerationJob:
        """The next clip: alpha one step further, rolling over to a new transition at 1."""
        if self.clips > 0:
            if self.alpha >= 1.0:
                self.start = self.end
                self.end = self._input(self.settings.prompt, _next_seed(self.start.seed))
                self.alpha = self.alpha_step
            else:
                self.alpha = min(1.0, round(self.alpha + self.alpha_step, 9))
        self.clips += 1
        return GenerationJob(
            start=self.start,
            end=self.end,
            alpha=self.alpha,
            num_inference_steps=self.settings.num_inference_steps,
            seed_image_id=self.settings.seed_image_id,
            mask_image_id=self.settings.mask_image_id,
        )

    def steer(self, steer: JamSteer) -> None:
        """Head for ``steer.prompt`` from the next clip on (its end keeps the seed)."""
        update: dict[str, object] = {"prompt": steer.prompt}
        if "negative_prompt" in steer.model_fields_set:
            update["negative_prompt"] = steer.negative_prompt
        if steer.seed_image_id is not None:
            update["seed_image_id"] = steer.seed_image_id
        if "mask_image_id" in steer.model_fields_set:
            update["mask_image_id"] = steer.mask_image_id or None
        self.settings = self.settings.model_copy(update=update)
        if self.clips > 0 and self.alpha >= 1.0:
            return  # the end was just heard: the next transition heads for the new target
        self.end = self._input(steer.prompt, self.end.seed)


def _next_seed(seed: int) -> int:
    return seed + 1 if seed < MAX_SEED else 0
