"""Long audio and interpolation as lists of generation jobs, and stitching the results.

- ``plan_riff``: audio-to-audio on a track of any length. The track is cut into
  overlapping clips; each clip's own spectrogram is the init image of one job,
  with an optional alpha walk from the start to the end prompt input. The plan
  also keeps each source clip's length, which ``stitch_clips`` fits the results to.
- ``interpolation_jobs``: N clips walking alpha evenly from 0 to 1 on one seed image.
- ``stitch_clips``: crossfade generated clips back into one track.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from riffusion.audio import Audio, AudioError, crossfade_clips, resample, slice_clips, to_mono
from riffusion.schemas import (
    MAX_WIDTH,
    MIN_WIDTH,
    SAMPLE_RATE,
    STEP_SIZE_MS,
    WIDTH_MULTIPLE,
    GenerationJob,
    PromptInput,
)

if TYPE_CHECKING:
    from riffusion.spectrogram import SpectrogramParams

CLIP_DURATION_S = 5.12
OVERLAP_S = 0.2
# Denoising that changes the sound while keeping the source recognisable.
RIFF_DENOISING = 0.5


def alphas_along(num_clips: int) -> list[float]:
    """``num_clips`` alphas evenly spaced from 0 to 1 (a single clip gets 0)."""
    if num_clips < 1:
        raise ValueError(f"need at least one clip, got {num_clips}")
    if num_clips == 1:
        return [0.0]
    return [index / (num_clips - 1) for index in range(num_clips)]


def _with_default_denoising(prompt_input: PromptInput, denoising: float) -> PromptInput:
    """``prompt_input`` with ``denoising`` unless the caller set denoising explicitly."""
    if "denoising" in prompt_input.model_fields_set:
        return prompt_input
    return prompt_input.model_copy(update={"denoising": denoising})


def prepare_track(audio: Audio, sample_rate: int = SAMPLE_RATE) -> Audio:
    """Mono at the spectrogram's sample rate: the model only knows mono spectrograms."""
    mono = to_mono(audio) if audio.channels > 1 else audio
    return resample(mono, sample_rate) if mono.sample_rate != sample_rate else mono


def clip_init_image_png(clip: Audio, params: SpectrogramParams | None = None) -> bytes:
    """A clip's spectrogram as PNG, cropped to a whole number of latent pixels (8 px).

    Clips shorter than the model's minimum width are padded with silence first.
    Needs torch (the model side of the service makes these).
    """
    from riffusion.spectrogram import SpectrogramParams, encode_image, image_from_audio

    params = params or SpectrogramParams()
    min_frames = (MIN_WIDTH - 1) * params.hop_length
    if clip.num_frames < min_frames:
        padding = np.zeros((clip.channels, min_frames - clip.num_frames), dtype=np.float32)
        clip = Audio(np.concatenate([clip.samples, padding], axis=1), clip.sample_rate)
    image = image_from_audio(clip, params.replace(stereo=False))
    width = min(image.width // WIDTH_MULTIPLE * WIDTH_MULTIPLE, MAX_WIDTH)
    return encode_image(image.crop((0, 0, width, image.height)))


@dataclass(frozen=True)
class RiffPlan:
    """The jobs for a track, each one's source clip, and their lengths for ``stitch_clips``.

    A job's init image is its clip's spectrogram (``with_init_image``): ``plan_riff``
    makes them; the service sends the clips and the model service makes them there.
    """

    jobs: list[GenerationJob]
    clip_num_frames: list[int]  # samples at the spectrogram's sample rate
    clips: list[Audio]


def slice_riff(
    audio: Audio,
    start: PromptInput,
    end: PromptInput | None = None,
    *,
    num_inference_steps: int = 50,
    clip_duration_s: float = CLIP_DURATION_S,
    overlap_s: float = OVERLAP_S,
    denoising: float = RIFF_DENOISING,
    sample_rate: int = SAMPLE_RATE,
    step_size_ms: int = STEP_SIZE_MS,
) -> RiffPlan:
    """One job per overlapping clip of ``audio``, in track order, without its init image.

    ``denoising`` applies to a prompt input that does not set its own. With an
    ``end`` input, alpha walks from 0 on the first clip to 1 on the last. The
    track is mixed down, resampled and sliced once. Needs no torch.
    """
    max_duration_s = MAX_WIDTH * step_size_ms / 1000
    if not 0 < clip_duration_s <= max_duration_s:
        raise AudioError(
            f"clip duration must be in (0, {max_duration_s}] s, got {clip_duration_s} s"
        )
    clips = slice_clips(prepare_track(audio, sample_rate), clip_duration_s, overlap_s)
    start = _with_default_denoising(start, denoising)
    end = _with_default_denoising(end, denoising) if end is not None else None
    alphas = alphas_along(len(clips)) if end is not None else [0.0] * len(clips)
    jobs = [
        GenerationJob(start=start, end=end, alpha=alpha, num_inference_steps=num_inference_steps)
        for alpha in alphas
    ]
    return RiffPlan(jobs, [clip.num_frames for clip in clips], clips)


def with_init_image(
    job: GenerationJob,
    clip: Audio,
    mask_image_id: str | None = None,
    params: SpectrogramParams | None = None,
) -> GenerationJob:
    """``job`` starting from ``clip``'s spectrogram (and ``mask_image_id``). Needs torch."""
    return GenerationJob(
        **{
            **dict(job),
            "init_image_png": clip_init_image_png(clip, params),
            "mask_image_id": mask_image_id,
        }
    )


def plan_riff(
    audio: Audio,
    start: PromptInput,
    end: PromptInput | None = None,
    *,
    mask_image_id: str | None = None,
    params: SpectrogramParams | None = None,
    **slicing: Any,
) -> RiffPlan:
    """``slice_riff`` (``slicing``: its keyword options), each job with its init image:
    one img2img job per overlapping clip."""
    if params is None:
        from riffusion.spectrogram import SpectrogramParams

        params = SpectrogramParams()
    slicing = {"sample_rate": params.sample_rate, "step_size_ms": params.step_size_ms, **slicing}
    plan = slice_riff(audio, start, end, **slicing)
    jobs = [
        with_init_image(job, clip, mask_image_id, params)
        for job, clip in zip(plan.jobs, plan.clips, strict=True)
    ]
    return RiffPlan(jobs, plan.clip_num_frames, plan.clips)


def interpolation_jobs(
    start: PromptInput,
    end: PromptInput,
    num_clips: int,
    seed_image_id: str,
    mask_image_id: str | None = None,
    num_inference_steps: int = 50,
) -> list[GenerationJob]:
    """``num_clips`` jobs on one seed image with alpha evenly spaced from 0 to 1."""
    return [
        GenerationJob(
            start=start,
            end=end,
            alpha=alpha,
            num_inference_steps=num_inference_steps,
            seed_image_id=seed_image_id,
            mask_image_id=mask_image_id,
        )
        for alpha in alphas_along(num_clips)
    ]


def fit_length(clip: Audio, num_frames: int) -> Audio:
    """``clip`` trimmed or padded with silence at the end to ``num_frames`` samples."""
    if clip.num_frames >= num_frames:
        return Audio(clip.samples[:, :num_frames], clip.sample_rate)
    padding = np.zeros((clip.channels, num_frames - clip.num_frames), dtype=clip.samples.dtype)
    return Audio(np.concatenate([clip.samples, padding], axis=1), clip.sample_rate)


def stitch_clips(
    clips: Sequence[Audio],
    overlap_s: float = OVERLAP_S,
    clip_num_frames: Sequence[int] | None = None,
) -> Audio:
    """Crossfade ``clips`` over ``overlap_s`` into one track.

    ``clip_num_frames`` (``RiffPlan.clip_num_frames``) first fits each clip to
    its source clip's length, so the result lines up with the source track:
    Griffin-Lim returns one hop less than the source and the image width is
    rounded down to 8 px.
    """
    if clip_num_frames is not None:
        if len(clip_num_frames) != len(clips):
            raise AudioError(f"got {len(clips)} clips but {len(clip_num_frames)} target lengths")
        clips = [fit_length(clip, n) for clip, n in zip(clips, clip_num_frames, strict=True)]
    return crossfade_clips(clips, overlap_s)


__all__ = [
    "CLIP_DURATION_S",
    "OVERLAP_S",
    "RIFF_DENOISING",
    "RiffPlan",
    "alphas_along",
    "clip_init_image_png",
    "fit_length",
    "interpolation_jobs",
    "plan_riff",
    "prepare_track",
    "slice_riff",
    "stitch_clips",
    "with_init_image",
]
