"""Riffing long audio and interpolation jobs, run through the tiny pipeline on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from riffusion.audio import Audio, AudioError
from riffusion.models import build_tiny_components
from riffusion.pipeline import RiffusionPipeline
from riffusion.riff import (
    RIFF_DENOISING,
    alphas_along,
    fit_length,
    interpolation_jobs,
    plan_riff,
    stitch_clips,
)
from riffusion.schemas import PromptInput
from riffusion.spectrogram import SpectrogramParams

START = PromptInput(prompt="lofi piano", seed=3)
END = PromptInput(prompt="distorted guitar", seed=4, denoising=0.4)


def track(seconds: float, sample_rate: int = 44100, channels: int = 1) -> Audio:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    return Audio(np.tile(tone.astype(np.float32), (channels, 1)), sample_rate)


def test_riff_plan_covers_the_track_with_init_images() -> None:
    audio = track(2.5, sample_rate=22050, channels=2)  # resampled and mixed down
    plan = plan_riff(audio, START, END, num_inference_steps=3, clip_duration_s=1.28, overlap_s=0.2)
    jobs = plan.jobs
    # Clips start every 1.08 s: 0, 1.08, 2.16 (the last one 0.34 s long).
    assert len(jobs) == 3
    assert [job.alpha for job in jobs] == [0.0, 0.5, 1.0]
    assert plan.clip_num_frames == [56448, 56448, 14994]
    for job in jobs:
        assert job.init_image_png is not None and job.seed_image_id is None
        image = Image.open(io.BytesIO(job.init_image_png))
        assert image.height == 512 and image.width % 8 == 0 and image.width >= 64
        # The start input did not set denoising, so it gets the riff default; the end keeps its own.
        assert job.start.denoising == RIFF_DENOISING
        assert job.end is not None and job.end.denoising == 0.4
    widths = [Image.open(io.BytesIO(job.init_image_png or b"")).width for job in jobs]
    assert widths == [128, 128, 64]  # the short last clip is padded to the minimum width
    assert all(job.alpha == 0.0 for job in plan_riff(audio, START, clip_duration_s=1.28).jobs)


def test_riff_plan_rejects_bad_clip_lengths() -> None:
    with pytest.raises(AudioError, match="clip duration"):
        plan_riff(track(1.0), START, clip_duration_s=30.0)
    with pytest.raises(AudioError, match="overlap"):
        plan_riff(track(1.0), START, clip_duration_s=1.0, overlap_s=1.0)


def test_interpolation_jobs_walk_alpha_on_one_seed_image() -> None:
    jobs = interpolation_jobs(START, END, 4, "og_beat", "mask_left_half", num_inference_steps=7)
    assert [job.alpha for job in jobs] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert {job.seed_image_id for job in jobs} == {"og_beat"}
    assert {job.mask_image_id for job in jobs} == {"mask_left_half"}
    assert {job.num_inference_steps for job in jobs} == {7}
    assert alphas_along(1) == [0.0]
    with pytest.raises(ValueError, match="at least one clip"):
        alphas_along(0)


def test_stitch_fits_each_clip_to_its_source_length_and_crossfades() -> None:
    ones = Audio(np.ones((1, 1000), np.float32), 1000)
    twos = Audio(np.full((1, 900), 2.0, np.float32), 1000)
    stitched = stitch_clips([ones, twos], overlap_s=0.1, clip_num_frames=[1000, 1000])
    assert stitched.num_frames == 1000 + 1000 - 100
    assert np.all(stitched.samples[0, :900] == 1.0)
    # Inside the overlap, the first clip fades out while the second fades in.
    fade = stitched.samples[0, 900:1000]
    assert 1.0 < fade[50] < 2.5 and fade[0] < fade[-1]
    # The second clip was padded with silence to its source length.
    assert np.all(stitched.samples[0, -100:] == 0.0)
    assert fit_length(twos, 500).num_frames == 500
    with pytest.raises(AudioError, match="2 clips but 1 target"):
        stitch_clips([ones, twos], 0.1, clip_num_frames=[1000])


def test_riff_a_short_track_end_to_end() -> None:
    pipeline = RiffusionPipeline(
        build_tiny_components(device="cpu"),
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )
    audio = track(1.6)
    plan = plan_riff(audio, START, END, num_inference_steps=2, clip_duration_s=0.72, overlap_s=0.1)
    assert len(plan.jobs) == 3
    clips = pipeline.run(plan.jobs)
    riffed = stitch_clips([clip.audio for clip in clips], 0.1, plan.clip_num_frames)
    assert riffed.sample_rate == 44100
    assert riffed.num_frames == audio.num_frames
    assert np.isfinite(riffed.samples).all() and np.abs(riffed.samples).max() <= 1.0
    # Every clip contributes sound of its own.
    for clip in clips:
        assert np.sqrt(np.mean(clip.audio.samples**2)) > 0.01
