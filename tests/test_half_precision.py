"""The generation path in the dtypes a GPU deployment uses (float16, bfloat16), on the CPU.

The tiny model runs the whole path (text encoder, UNet, VAE encode and decode,
Griffin-Lim, loudness, the engine) in half precision and is compared with the
float32 reference. Post-processing is float32 whatever the model's dtype (the
decode scale, 30e6, overflows float16): half-precision amplitudes are refused.

Tolerances, measured on the tiny model (random weights, 3 steps, 64 px) and set
about 3x above what was seen (pytest -s prints them):

- final latents, relative L2 error against float32: float16 0.0009-0.0014, bfloat16
  0.007-0.012;
- decoded uint8 pixels: float16 mean |diff| 0.07-0.08 level (max 1-2), bfloat16 mean
  0.6 (max 8-12);
- the audio's mel spectrogram against the float32 clip's (spectral convergence; the
  waveforms themselves differ more, Griffin-Lim's phase follows small changes):
  float16 0.004-0.006, bfloat16 0.016-0.032.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from riffusion.models import build_tiny_components
from riffusion.pipeline import GeneratedClip, RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import (
    SpectrogramError,
    SpectrogramParams,
    get_converter,
    mel_amplitudes_from_pixels,
    spectral_convergence,
)
from tests.test_engine import PacedPipeline, make_engine
from tests.test_pipeline import write_library

FAST_PARAMS = SpectrogramParams(num_griffin_lim_iters=2)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Bounds per dtype: (latent relative error, pixel mean |diff|, pixel max |diff|,
# mel spectral convergence of the audio).
BOUNDS = {
    torch.float16: (0.005, 0.25, 4, 0.02),
    torch.bfloat16: (0.035, 2.0, 30, 0.1),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> SeedImageLibrary:
    return write_library(tmp_path_factory.mktemp("seed_images"))


def pipeline_in(dtype: torch.dtype, library: SeedImageLibrary) -> RiffusionPipeline:
    components = build_tiny_components(device="cpu", dtype=dtype)
    return RiffusionPipeline(components, seed_images=library, spectrogram_params=FAST_PARAMS)


@pytest.fixture(scope="module")
def pipelines(library: SeedImageLibrary) -> dict[torch.dtype, RiffusionPipeline]:
    return {dtype: pipeline_in(dtype, library) for dtype in (torch.float32, *HALF_DTYPES)}


def jobs() -> list[GenerationJob]:
    """Text-to-audio with an interpolation, img2img, and img2img under a mask."""
    start = PromptInput(prompt="church bells", seed=3, guidance=7.0, denoising=0.75)
    end = PromptInput(prompt="(heavy:1.3) drums", seed=4, guidance=5.0, denoising=0.6)
    seeded = {"seed_image_id": "narrow_beat", "num_inference_steps": 4}
    return [
        GenerationJob(start=start, end=end, alpha=0.3, num_inference_steps=3, width=64),
        GenerationJob(start=start, **seeded),  # type: ignore[arg-type]
        GenerationJob(start=end, mask_image_id="left_white", **seeded),  # type: ignore[arg-type]
    ]


@pytest.fixture(scope="module")
def reference(pipelines: dict[torch.dtype, RiffusionPipeline]) -> list[GeneratedClip]:
    return pipelines[torch.float32].run(jobs())


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return float((reference - value).norm() / reference.norm())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_the_half_precision_path_matches_float32_within_its_tolerances(
    dtype: torch.dtype,
    pipelines: dict[torch.dtype, RiffusionPipeline],
    reference: list[GeneratedClip],
) -> None:
    pipeline = pipelines[dtype]
    assert pipeline.describe()["dtype"] == str(dtype).removeprefix("torch.")
    assert pipeline.components.unet.dtype == dtype
    latent_bound, mean_bound, max_bound, audio_bound = BOUNDS[dtype]
    clips = pipeline.run(jobs())
    converter = get_converter(FAST_PARAMS, "cpu")
    for index, (clip, expected) in enumerate(zip(clips, reference, strict=True)):
        # The pipeline hands float32 out whatever it computed in.
        assert clip.latents.dtype == torch.float32
        assert clip.audio.samples.dtype == np.float32
        assert np.isfinite(clip.audio.samples).all()
        assert clip.audio.samples.shape == expected.audio.samples.shape
        latent_error = relative_error(expected.latents, clip.latents)
        pixels = np.asarray(clip.image, np.int16)
        diff = np.abs(pixels - np.asarray(expected.image, np.int16))
        mel = converter.mel_amplitudes_from_waveform(torch.from_numpy(clip.audio.samples))
        mel_expected = converter.mel_amplitudes_from_waveform(
            torch.from_numpy(expected.audio.samples)
        )
        convergence = spectral_convergence(mel_expected, mel)
        measured = (
            f"job {index} {dtype}: latents {latent_error:.4f}, pixels mean {diff.mean():.3f} "
            f"max {diff.max()}, audio mel convergence {convergence:.3f}"
        )
        print(measured)
        assert latent_error <= latent_bound, measured
        assert diff.mean() <= mean_bound, measured
        assert diff.max() <= max_bound, measured
        assert convergence <= audio_bound, measured


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_seed_image_latents_do_not_depend_on_the_model_dtype(
    dtype: torch.dtype, pipelines: dict[torch.dtype, RiffusionPipeline]
) -> None:
    """The VAE posterior's sample noise is drawn in float32: a CPU generator draws
    other numbers in half precision (the float16 seed latents were 138 % off)."""
    job = jobs()[1]
    latents = {key: pipelines[key].prepare(job).init_latents for key in (torch.float32, dtype)}
    assert latents[dtype] is not None and latents[torch.float32] is not None
    assert latents[dtype].dtype == torch.float32
    assert relative_error(latents[torch.float32], latents[dtype]) <= BOUNDS[dtype][0]


def test_post_processing_is_float32_whatever_the_model_dtype(
    pipelines: dict[torch.dtype, RiffusionPipeline],
) -> None:
    """The same pixels give the same audio bits from a float16, bfloat16 or float32 model."""
    pixels = torch.randint(0, 256, (1, 3, 512, 64), generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(torch.uint8)
    audio = {
        dtype: pipeline.griffin_lim(pixels, [torch.Generator().manual_seed(7)])[0]
        for dtype, pipeline in pipelines.items()
    }
    for dtype in HALF_DTYPES:
        assert audio[dtype].dtype == np.float32
        assert np.array_equal(audio[dtype], audio[torch.float32])


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_amplitudes_are_refused_rather_than_overflowed(dtype: torch.dtype) -> None:
    # A black pixel decodes to the full scale, 30e6: past float16's 65504.
    black = torch.zeros(1, 3, 512, 64, dtype=torch.uint8)
    amplitudes = mel_amplitudes_from_pixels(black, FAST_PARAMS)
    assert amplitudes.dtype == torch.float32
    if dtype == torch.float16:
        assert torch.isinf(amplitudes.to(dtype)).all()
    converter = get_converter(FAST_PARAMS, "cpu")
    with pytest.raises(SpectrogramError, match=str(dtype).removeprefix("torch.")):
        converter.waveform_from_mel_amplitudes(amplitudes.to(dtype))
    with pytest.raises(SpectrogramError, match="float32"):
        converter.linear_amplitudes_from_mel(amplitudes[0].to(dtype))
    with pytest.raises(SpectrogramError, match="NaN or infinite"):
        converter.waveform_from_mel_amplitudes(amplitudes.half().float())


def test_a_vae_that_overflows_in_float16_fails_the_clip_instead_of_giving_noise(
    library: SeedImageLibrary,
) -> None:
    pipeline = pipeline_in(torch.float16, library)
    conv_out = pipeline.components.vae.decoder.conv_out
    with torch.no_grad():
        # Outputs at float16's largest value: any positive contribution overflows.
        conv_out.bias.fill_(torch.finfo(torch.float16).max)
        conv_out.weight.mul_(100)
    latents = torch.randn(1, 4, 64, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="non-finite"):
        pipeline.decode_pixels(latents)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_the_engine_in_half_precision_joins_jobs_mid_way_without_changing_them(
    dtype: torch.dtype, pipelines: dict[torch.dtype, RiffusionPipeline]
) -> None:
    pipeline = PacedPipeline(
        pipelines[dtype].components,
        seed_images=pipelines[dtype].seed_images,
        spectrogram_params=FAST_PARAMS,
    )
    _, joiner, img2img = jobs()
    first = jobs()[0].model_copy(update={"num_inference_steps": 12})
    alone = pipeline.run([first, joiner, img2img])
    engine, recorder = make_engine(pipeline)
    try:
        running = engine.submit(first)
        recorder.wait_steps(4)  # first is 4 steps in when the others join
        joined = [engine.submit(joiner), engine.submit(img2img)]
        clips = [entry.future.result(timeout=120) for entry in (running, *joined)]
    finally:
        engine.stop()
    assert max(recorder.batch_sizes) >= 2
    for clip, expected in zip(clips, alone, strict=True):
        # Batch-invariant to within one half-precision rounding of the UNet output.
        assert relative_error(expected.latents, clip.latents) <= 1e-2
        diff = np.abs(np.asarray(clip.image, np.int16) - np.asarray(expected.image, np.int16))
        assert diff.max() <= 2
