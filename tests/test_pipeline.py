"""Batched pipeline semantics on the tiny model (CPU, fp32).

Images are kept narrow (64 px = 0.64 s) and steps few so the file runs in
about a minute; Griffin-Lim runs 2 iterations where audio quality is not the point.

Batch invariance tolerance: on CPU a batched UNet/VAE forward may pick other
kernels than a batch of one, so a job's final latents in a mixed batch match
the job alone within 1e-4 (absolute) and its decoded uint8 image within 1 level.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler
from PIL import Image

from riffusion.audio import Audio
from riffusion.latents import model_output_to_pixels
from riffusion.models import build_tiny_components
from riffusion.pipeline import GeneratedClip, InvalidJobError, RiffusionPipeline
from riffusion.riff import clip_init_image_png
from riffusion.schemas import GenerationJob, PromptInput, SchedulerName
from riffusion.seed_images import SeedImageLibrary, UnknownImageError
from riffusion.spectrogram import ExifTag, SpectrogramParams

LATENT_ATOL = 1e-4
FAST_PARAMS = SpectrogramParams(num_griffin_lim_iters=2)
SEED_WIDTH = 64


def synth_track(seconds: float, sample_rate: int = 44100) -> Audio:
    """A deterministic test signal: a gliding tone over a pulse train."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 200 * t) * t)
    pulses = 0.2 * (np.sin(2 * np.pi * 4 * t) > 0.95)
    return Audio((tone + pulses).astype(np.float32)[None], sample_rate)


def write_library(directory: Path) -> SeedImageLibrary:
    """A seed-image library with one narrow seed and white/black/half masks."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "narrow_beat.png").write_bytes(clip_init_image_png(synth_track(0.7)))
    masks = {
        "all_white": np.full((512, SEED_WIDTH), 255, np.uint8),
        "all_black": np.zeros((512, SEED_WIDTH), np.uint8),
        # Repaint the left half (first 0.64 s), keep the right half.
        "left_white": np.concatenate(
            [
                np.full((512, SEED_WIDTH // 2), 255, np.uint8),
                np.zeros((512, SEED_WIDTH // 2), np.uint8),
            ],
            axis=1,
        ),
    }
    for mask_id, pixels in masks.items():
        Image.fromarray(pixels, mode="L").save(directory / f"{mask_id}.png")
    entries = [{"id": "narrow_beat", "kind": "seed", "file": "narrow_beat.png", "tempo_bpm": None}]
    entries += [{"id": mask_id, "kind": "mask", "file": f"{mask_id}.png"} for mask_id in masks]
    (directory / "manifest.json").write_text(json.dumps({"images": entries}))
    return SeedImageLibrary(directory)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> SeedImageLibrary:
    return write_library(tmp_path_factory.mktemp("seed_images"))


@pytest.fixture(scope="module")
def pipeline(library: SeedImageLibrary) -> RiffusionPipeline:
    return RiffusionPipeline(
        build_tiny_components(device="cpu"), seed_images=library, spectrogram_params=FAST_PARAMS
    )


JAZZ = PromptInput(prompt="smooth jazz with piano", seed=11, guidance=6.0, denoising=0.6)
DRUMS = PromptInput(
    prompt="(heavy:1.3) drums", seed=22, negative_prompt="vocals", guidance=3.0, denoising=0.8
)


def txt2img(**fields: object) -> GenerationJob:
    values: dict[str, object] = {"start": JAZZ, "num_inference_steps": 3, "width": 64}
    values.update(fields)
    return GenerationJob.model_validate(values)


def img2img(**fields: object) -> GenerationJob:
    values: dict[str, object] = {
        "start": JAZZ,
        "num_inference_steps": 4,
        "seed_image_id": "narrow_beat",
    }
    values.update(fields)
    return GenerationJob.model_validate(values)


def pixels(clip: GeneratedClip) -> np.ndarray:
    return np.asarray(clip.image, dtype=np.int16)


def assert_same_clip(a: GeneratedClip, b: GeneratedClip) -> None:
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.array_equal(a.audio.samples, b.audio.samples)


# --- outputs -----------------------------------------------------------------------------------


def test_output_shapes_exif_audio_and_timings(pipeline: RiffusionPipeline) -> None:
    txt, img = pipeline.run([txt2img(width=96), img2img()])
    assert txt.image.size == (96, 512) and img.image.size == (SEED_WIDTH, 512)
    assert txt.latents.shape == (1, 4, 64, 12)
    exif = Image.open(io.BytesIO(_png(txt.image))).getexif()
    assert exif[ExifTag.SAMPLE_RATE.value] == 44100
    assert exif[ExifTag.NUM_FREQUENCIES.value] == 512
    # Griffin-Lim gives (frames - 1) hops of audio, loudness-normalised to about -12 dBFS.
    assert txt.audio.sample_rate == 44100
    assert txt.audio.num_frames == (96 - 1) * 441
    rms_db = 20 * np.log10(np.sqrt(np.mean(img.audio.samples.astype(np.float64) ** 2)))
    assert -13.0 < rms_db < -11.0 or np.abs(img.audio.samples).max() > 0.98
    for clip in (txt, img):
        assert set(clip.timings) >= {
            "encode",
            "denoise",
            "denoise_per_step",
            "decode",
            "griffin_lim",
            "total",
        }
        assert all(value >= 0 for value in clip.timings.values())
        assert clip.timings["total"] >= clip.timings["denoise"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=image.getexif())
    return buffer.getvalue()


# --- interpolation endpoints -------------------------------------------------------------------


def test_alpha_zero_and_one_equal_each_input_alone(pipeline: RiffusionPipeline) -> None:
    both = JAZZ.model_copy(update={"seed": DRUMS.seed})
    pairs = [
        (txt2img(end=DRUMS, alpha=0.0), txt2img()),
        (txt2img(end=DRUMS, alpha=1.0), txt2img(start=DRUMS)),
        # img2img: the seed image's VAE sample uses the start seed, so the seeds agree here.
        (img2img(start=both, end=DRUMS, alpha=1.0), img2img(start=DRUMS)),
    ]
    alone_clips = []
    for walked_job, alone_job in pairs:
        (walked,) = pipeline.run([walked_job])
        (alone,) = pipeline.run([alone_job])
        assert torch.equal(walked.latents, alone.latents)
        assert np.array_equal(pixels(walked), pixels(alone))
        alone_clips.append(alone)
    start_alone, end_alone = alone_clips[:2]
    (midpoint,) = pipeline.run([txt2img(end=DRUMS, alpha=0.5)])
    assert not torch.allclose(midpoint.latents, start_alone.latents, atol=1e-2)
    assert not torch.allclose(midpoint.latents, end_alone.latents, atol=1e-2)


# --- batching ------------------------------------------------------------------------------------


def mixed_jobs() -> list[GenerationJob]:
    return [
        img2img(end=DRUMS, alpha=0.25),
        txt2img(start=DRUMS, num_inference_steps=5, scheduler=SchedulerName.euler_ancestral),
        img2img(
            start=DRUMS, end=JAZZ, alpha=0.6, num_inference_steps=6, mask_image_id="left_white"
        ),
        img2img(num_inference_steps=3, scheduler=SchedulerName.dpm_multistep),
        txt2img(end=DRUMS, alpha=0.5, scheduler=SchedulerName.ddim),
        img2img(start=JAZZ.model_copy(update={"denoising": 0.3}), scheduler=SchedulerName.lms),
        txt2img(width=128, scheduler=SchedulerName.euler),
    ]


def test_batch_invariance_and_determinism(pipeline: RiffusionPipeline) -> None:
    jobs = mixed_jobs()
    batched = pipeline.run(jobs)
    again = pipeline.run(jobs)
    for first, second in zip(batched, again, strict=True):
        assert_same_clip(first, second)

    for job, in_batch in zip(jobs, batched, strict=True):
        (alone,) = pipeline.run([job])
        torch.testing.assert_close(in_batch.latents, alone.latents, atol=LATENT_ATOL, rtol=0)
        assert np.abs(pixels(in_batch) - pixels(alone)).max() <= 1
        assert in_batch.audio.num_frames == alone.audio.num_frames

    # Each job really is different: no two outputs coincide.
    for i in range(len(batched)):
        for j in range(i + 1, len(batched)):
            if batched[i].latents.shape == batched[j].latents.shape:
                assert not torch.allclose(batched[i].latents, batched[j].latents, atol=1e-2)


def test_same_job_twice_in_one_batch_is_identical(pipeline: RiffusionPipeline) -> None:
    job = img2img(end=DRUMS, alpha=0.4, scheduler=SchedulerName.euler_ancestral)
    first, second = pipeline.run([job, job])
    assert_same_clip(first, second)


def test_progress_counts_every_job_step(pipeline: RiffusionPipeline) -> None:
    calls: list[tuple[int, int]] = []
    pipeline.run(
        [txt2img(num_inference_steps=2), txt2img(num_inference_steps=4, width=128)],
        progress=lambda done, total: calls.append((done, total)),
    )
    # PNDM (the tiny model's default) runs one extra warm-up step per job.
    total = calls[-1][1]
    assert calls[-1][0] == total == 3 + 5
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


# --- masks ---------------------------------------------------------------------------------------


def test_white_mask_equals_no_mask(pipeline: RiffusionPipeline) -> None:
    (plain,) = pipeline.run([img2img()])
    (white,) = pipeline.run([img2img(mask_image_id="all_white")])
    assert torch.equal(plain.latents, white.latents)


def expected_kept_latents(pipeline: RiffusionPipeline, job: GenerationJob) -> torch.Tensor:
    """The seed image's init latents noised to the job's last timestep, by diffusers directly."""
    state = pipeline.prepare(job)
    assert state.init_latents is not None
    noiser = PNDMScheduler.from_config(pipeline.components.scheduler_config)
    return noiser.add_noise(state.init_latents, state.noise, state.schedule.timesteps[-1:])


def test_black_mask_keeps_the_seed_image(pipeline: RiffusionPipeline) -> None:
    job = img2img(mask_image_id="all_black")
    (clip,) = pipeline.run([job])
    torch.testing.assert_close(
        clip.latents, expected_kept_latents(pipeline, job), atol=1e-6, rtol=0
    )


def test_half_mask_repaints_left_and_keeps_right(pipeline: RiffusionPipeline) -> None:
    job = img2img(mask_image_id="left_white")
    (clip,) = pipeline.run([job])
    (unmasked,) = pipeline.run([img2img()])
    kept = expected_kept_latents(pipeline, job)
    half = clip.latents.shape[-1] // 2
    # Right half: exactly the seed image (noised); left half: generated like the unmasked run.
    torch.testing.assert_close(clip.latents[..., half:], kept[..., half:], atol=1e-6, rtol=0)
    assert (clip.latents[..., :half] - kept[..., :half]).abs().mean() > 0.05
    assert (unmasked.latents[..., half:] - kept[..., half:]).abs().mean() > 0.05


# --- caches and validation -----------------------------------------------------------------------


def test_web_app_session_re_encodes_nothing(library: SeedImageLibrary) -> None:
    pipeline = RiffusionPipeline(
        build_tiny_components(device="cpu"), seed_images=library, spectrogram_params=FAST_PARAMS
    )
    session = [img2img(end=DRUMS, alpha=alpha, num_inference_steps=2) for alpha in (0.0, 0.25)]
    pipeline.run(session)
    stats = pipeline.cache_stats()
    text_misses, seed_misses = stats["text_embeddings"].misses, stats["seed_latents"].misses
    assert seed_misses == 1 and text_misses == 4  # JAZZ, DRUMS, "" and "vocals"
    text_hits, seed_hits = stats["text_embeddings"].hits, stats["seed_latents"].hits

    pipeline.run(
        [img2img(end=DRUMS, alpha=alpha, num_inference_steps=2) for alpha in (0.5, 0.75, 1.0)]
    )
    stats = pipeline.cache_stats()
    assert stats["text_embeddings"].misses == text_misses
    assert stats["seed_latents"].misses == seed_misses
    assert stats["text_embeddings"].hits > text_hits and stats["seed_latents"].hits == seed_hits + 3
    # A new start seed changes the VAE sample, so it is a new seed-latent entry.
    pipeline.run([img2img(start=JAZZ.model_copy(update={"seed": 99}), num_inference_steps=2)])
    stats = pipeline.cache_stats()
    assert stats["seed_latents"].misses == seed_misses + 1


def test_jobs_are_validated_before_any_compute(library: SeedImageLibrary) -> None:
    pipeline = RiffusionPipeline(
        build_tiny_components(device="cpu"), seed_images=library, spectrogram_params=FAST_PARAMS
    )
    with pytest.raises(UnknownImageError, match="nope"):
        pipeline.run([img2img(), img2img(seed_image_id="nope")])
    with pytest.raises(UnknownImageError, match="valid ids"):
        pipeline.run([img2img(mask_image_id="narrow_beat")])  # a seed is not a mask
    tall = Image.new("RGB", (128, 256))
    buffer = io.BytesIO()
    tall.save(buffer, format="PNG")
    with pytest.raises(InvalidJobError, match="job 1: seed image is 256 px high"):
        pipeline.run([img2img(), img2img(seed_image_id=None, init_image_png=buffer.getvalue())])
    with pytest.raises(InvalidJobError, match="not a readable image"):
        pipeline.run([img2img(seed_image_id=None, init_image_png=b"not a png")])
    stats = pipeline.cache_stats()
    assert stats["seed_latents"].misses == 0 and stats["text_embeddings"].misses == 0


def test_init_image_png_is_a_seed_image(
    pipeline: RiffusionPipeline, library: SeedImageLibrary
) -> None:
    png = (library.directory / "narrow_beat.png").read_bytes()
    by_id, by_png = pipeline.run([img2img(), img2img(seed_image_id=None, init_image_png=png)])
    assert torch.equal(by_id.latents, by_png.latents)


def test_cpu_vae_decode_in_channels_last_matches_the_plain_layout(
    pipeline: RiffusionPipeline,
) -> None:
    """On a CPU the VAE runs channels-last (less memory, faster); the pixels stay those of
    the plain layout up to rounding (float sums in another order)."""
    vae = pipeline.components.vae
    assert next(vae.parameters()).is_contiguous(memory_format=torch.channels_last)
    latents = torch.randn(1, 4, 64, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        channels_last = pipeline.decode_pixels(latents)
        plain_vae = build_tiny_components(device="cpu").vae  # same seed, same weights
        plain = model_output_to_pixels(plain_vae.decode(latents / pipeline.vae_scaling).sample)
    assert channels_last.shape == plain.shape == (1, 3, 512, 256)
    difference = (channels_last.int() - plain.int()).abs()
    assert int(difference.max()) <= 1
    assert float((difference > 0).float().mean()) < 0.02
