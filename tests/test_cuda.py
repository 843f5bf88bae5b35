"""The GPU path on CUDA: skipped without a CUDA device; the GPU kit (bench/gpu_kit.py) runs them.

Full-size SD1.5 architecture with random weights (bench/bench_pipeline_gpu.py builds
it; same compute as the checkpoint, no download). What they check:

1. the float16 pipeline against a float32 reference on the same GPU;
2. the traced and the compiled UNet against eager at every batch bucket the engine
   forms (1..16 samples: up to 8 jobs of 2 guided samples);
3. Griffin-Lim on CUDA against the CPU's, from the same generator;
4. a job that joins the engine mid-way on CUDA, against the job alone, and the step
   times the engine learns there: the device's, not the host's;
5. the peak GPU memory of a full batch (8 clips of 512 px, the web app's request)
   under an A10G's 24 GB.

Tolerances for 1-3 are assumptions until the kit's first run prints the measured
values (``-s``); each failure message holds the measured value. The compiled UNet's
test is last: it compiles the full UNet once per bucket (the slowest of them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.bench_pipeline_gpu import jobs_for, sd15_random_components
from riffusion.models import RiffusionComponents, build_tiny_components
from riffusion.pipeline import RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import (
    SpectrogramConverter,
    SpectrogramParams,
    mel_amplitudes_from_pixels,
    spectral_convergence,
)
from riffusion.unet_backends import BucketedUNet, EagerUNet, prepare_unet, trace_unet
from tests.test_engine import PacedPipeline, make_engine
from tests.test_pipeline import write_library

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
A10G_MEMORY_BYTES = 24 * 10**9
MAX_JOBS = 8  # the engine's default max_batch_size
BUCKETS = BucketedUNet(lambda *_: torch.empty(0), max_batch=2 * MAX_JOBS).buckets


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return float((reference.float() - value.float()).norm() / reference.float().norm())


@pytest.fixture(scope="module")
def sd15_fp16() -> RiffusionComponents:
    return sd15_random_components(CUDA, torch.float16)


def unet_inputs(
    components: RiffusionComponents, batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    dtype = components.dtype
    latents = torch.randn(batch, 4, 64, 64, generator=generator).to(CUDA, dtype)
    timesteps = torch.linspace(999, 1, batch).to(CUDA)
    text = torch.randn(batch, 77, 768, generator=generator).to(CUDA, dtype)
    return latents, timesteps, text


def test_fp16_pipeline_matches_an_fp32_reference_on_the_full_size_architecture(
    sd15_fp16: RiffusionComponents,
) -> None:
    job = jobs_for(1, steps=8, denoising=0.75, guidance=7.0)[0]
    params = SpectrogramParams()
    half = RiffusionPipeline(sd15_fp16, spectrogram_params=params).run([job])[0]
    reference_components = sd15_random_components(CUDA, torch.float32)
    try:
        full = RiffusionPipeline(reference_components, spectrogram_params=params).run([job])[0]
    finally:
        del reference_components
        torch.cuda.empty_cache()
    latent_error = relative_error(full.latents, half.latents)
    diff = np.abs(np.asarray(half.image, np.int16) - np.asarray(full.image, np.int16))
    measured = f"latents {latent_error:.4f}, pixels mean {diff.mean():.3f} max {diff.max()}"
    print(measured)
    assert np.isfinite(half.audio.samples).all(), measured
    assert latent_error <= 0.05, measured
    assert diff.mean() <= 2.0, measured


def test_traced_unet_matches_eager_at_every_batch_bucket(
    sd15_fp16: RiffusionComponents, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("trace")
    trace_unet(sd15_fp16, directory)  # raises TraceError when it does not reproduce eager
    traced = prepare_unet(sd15_fp16, "traced", traced_path=directory)
    eager = EagerUNet(sd15_fp16.unet)
    with torch.inference_mode():
        for batch in BUCKETS:
            inputs = unet_inputs(sd15_fp16, batch)
            expected, actual = eager(*inputs), traced(*inputs)
            error = float((actual.float() - expected.float()).abs().max())
            print(f"traced, batch {batch}: max |diff| {error:.4g}")
            assert error <= 1e-2 * max(1.0, float(expected.float().abs().max())), batch


def test_griffin_lim_on_cuda_matches_the_cpu() -> None:
    params = SpectrogramParams()
    pixels = torch.randint(0, 256, (2, 3, 512, 512), generator=torch.Generator().manual_seed(0))
    amplitudes = mel_amplitudes_from_pixels(pixels.to(torch.uint8), params)
    waveforms = {
        device: SpectrogramConverter(params, device).waveform_from_mel_amplitudes(
            amplitudes.to(device),
            generator=[torch.Generator().manual_seed(seed) for seed in (1, 2)],
        )
        for device in ("cpu", "cuda")
    }
    cpu, cuda = waveforms["cpu"], waveforms["cuda"].cpu()
    converter = SpectrogramConverter(params, "cpu")
    convergence = spectral_convergence(
        converter.mel_amplitudes_from_waveform(cpu), converter.mel_amplitudes_from_waveform(cuda)
    )
    waveform_error = relative_error(cpu, cuda)
    measured = f"waveform {waveform_error:.4g}, mel convergence {convergence:.4g}"
    print(measured)
    assert cuda.dtype == torch.float32 and cuda.shape == cpu.shape
    assert convergence <= 0.01, measured
    assert waveform_error <= 0.05, measured


def test_a_job_that_joins_the_engine_mid_way_on_cuda_matches_the_job_alone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    library: SeedImageLibrary = write_library(tmp_path_factory.mktemp("seed_images"))
    pipeline = PacedPipeline(
        build_tiny_components(device=CUDA),  # float16, the CUDA default
        seed_images=library,
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )
    start = PromptInput(prompt="church bells", seed=3, guidance=6.0, denoising=0.75)
    first = GenerationJob(start=start, num_inference_steps=12, width=64)
    joiner = GenerationJob(
        start=start.model_copy(update={"seed": 4}), num_inference_steps=6, width=64
    )
    img2img = GenerationJob(start=start, seed_image_id="narrow_beat", num_inference_steps=10)
    alone = pipeline.run([first, joiner, img2img])
    engine, recorder = make_engine(pipeline, postprocess="thread")
    try:
        running = engine.submit(first)
        recorder.wait_steps(4)
        joined = [engine.submit(joiner), engine.submit(img2img)]
        clips = [entry.future.result(timeout=120) for entry in (running, *joined)]
    finally:
        engine.stop()
    assert max(recorder.batch_sizes) >= 2
    for clip, expected in zip(clips, alone, strict=True):
        error = relative_error(expected.latents, clip.latents)
        diff = np.abs(np.asarray(clip.image, np.int16) - np.asarray(expected.image, np.int16))
        print(f"joined mid-way: latents {error:.3g}, pixels max {diff.max()}")
        assert error <= 1e-2
        assert diff.max() <= 2


def test_the_engine_learns_its_steps_device_time_not_the_hosts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Nothing in a step waits for the GPU: the step times the engine plans and admits
    with must be the device's (riffusion/step_timer.py), not the host's queueing time."""
    pipeline = RiffusionPipeline(  # not paced: the host must not wait between steps
        build_tiny_components(device=CUDA),
        seed_images=write_library(tmp_path_factory.mktemp("seed_images")),
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )
    cycles = 20_000_000

    def busy_unet(latents: torch.Tensor, *_: object) -> torch.Tensor:
        torch.cuda._sleep(cycles)  # the device busy; the host goes on at once
        return torch.zeros_like(latents)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    device_s = start.elapsed_time(end) / 1000
    pipeline.unet_forward = busy_unet  # type: ignore[assignment]
    job = GenerationJob(start=PromptInput(prompt="bells", seed=1), num_inference_steps=12, width=64)
    engine, recorder = make_engine(pipeline)
    try:
        engine.submit(job).future.result(timeout=120)
    finally:
        engine.stop()
    learned_s = engine.step_times.step_s(1)
    print(f"a step's device time {device_s * 1000:.1f} ms, learned {learned_s * 1000:.1f} ms")
    assert 0.8 * device_s <= learned_s <= 1.5 * device_s
    assert recorder.step_seconds and min(recorder.step_seconds) >= 0.8 * device_s


def test_peak_memory_of_a_full_batch_of_full_size_clips_fits_an_a10g(
    sd15_fp16: RiffusionComponents,
) -> None:
    pipeline = RiffusionPipeline(sd15_fp16, seed_images=SeedImageLibrary())
    jobs = jobs_for(MAX_JOBS, steps=4, denoising=0.75, guidance=7.0)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    clips = pipeline.run(jobs)
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    print(
        f"{MAX_JOBS} clips of 512 px: peak allocated {peak / 1e9:.2f} GB, "
        f"reserved {reserved / 1e9:.2f} GB"
    )
    assert len(clips) == MAX_JOBS
    assert reserved < A10G_MEMORY_BYTES


def test_compiled_unet_matches_eager_at_every_batch_bucket(
    sd15_fp16: RiffusionComponents,
) -> None:
    compiled = prepare_unet(sd15_fp16, "compiled")
    assert isinstance(compiled, BucketedUNet)
    eager = EagerUNet(sd15_fp16.unet)
    with torch.inference_mode():
        for batch in BUCKETS:
            inputs = unet_inputs(sd15_fp16, batch)
            expected, actual = eager(*inputs), compiled(*inputs)
            error = float((actual.float() - expected.float()).abs().max())
            print(f"compiled, batch {batch}: max |diff| {error:.4g}")
            assert error <= 1e-2 * max(1.0, float(expected.float().abs().max())), batch
        # A batch between buckets is padded and gives the rows of the batch alone.
        inputs = unet_inputs(sd15_fp16, 3)
        assert relative_error(eager(*inputs), compiled(*inputs)) <= 1e-2
