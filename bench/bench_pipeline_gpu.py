"""GPU benchmark: Riffusion's batched pipeline vs the plain diffusers img2img pipeline.

Full-size SD1.5 architecture (real weights from ``--model`` when given, else
random weights built from SD1.5's configs in code: same compute), riffusion's
defaults (50 steps, denoising 0.75, guidance 7, 512x512 seed image, fp16).
Reports, all in one run:

- per-step UNet time at batch 2 (one clip with guidance) per backend;
- clip latency and clips/s at batch 1, 2, 4, 8 for eager, traced and compiled;
- the plain diffusers ``StableDiffusionImg2ImgPipeline`` (batch 1, eager) as baseline;
- FLOP-based efficiency against the GPU's peak (``--peak-tflops``, default by
  device name) and the ratio of each figure to the baseline and to the FLOP floor;
- the cost of each accelerated call at each batch, the terms of ``riffusion.emulation``'s
  profiles: the UNet forward per backend at 2 x batch samples, and (once) the VAE
  encode, the VAE decode and Griffin-Lim at batch images or clips, each the median of
  5 synchronized calls after a warm-up (``{"costs": ...}`` rows; ``bench.gpu_digest``
  fits them into a profile).

Smoke mode for a machine without a GPU (checks the script, not the speed):

    uv run --frozen --all-extras python bench/bench_pipeline_gpu.py --device cpu --tiny --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from riffusion.latents import pixels_to_model_input
from riffusion.models import (
    DEFAULT_SCHEDULER_CONFIG,
    RiffusionComponents,
    build_tiny_components,
    load_components,
)
from riffusion.pipeline import RiffusionPipeline
from riffusion.schedulers import make_scheduler
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import SpectrogramParams
from riffusion.step_timer import synchronize
from riffusion.unet_backends import trace_unet

# Dense fp16 tensor-core peaks (TFLOP/s) by device-name fragment.
PEAK_TFLOPS = {"H100": 990.0, "H200": 990.0, "A100": 312.0, "A10G": 70.0, "L4": 121.0, "T4": 65.0}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def sd15_random_components(device: torch.device, dtype: torch.dtype) -> RiffusionComponents:
    """SD1.5's architecture with random weights (the tokenizer is the tiny model's)."""
    tiny = build_tiny_components(device="cpu", dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_config = CLIPTextConfig(
            **SD15_TEXT,
            bos_token_id=tiny.tokenizer.bos_token_id,
            eos_token_id=tiny.tokenizer.eos_token_id,
            pad_token_id=tiny.tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
        unet: Any = UNet2DConditionModel(**SD15_UNET)
        vae: Any = AutoencoderKL(**SD15_VAE)
    modules: list[Any] = [unet, vae, text_encoder]
    for module in modules:
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return RiffusionComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG),
        model_id="sd15-architecture-random-weights",
        is_tiny=False,
        device=device,
        dtype=dtype,
    )


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def jobs_for(batch: int, steps: int, denoising: float, guidance: float) -> list[GenerationJob]:
    """The web app's request shape: two prompts, alpha walking, seed image og_beat."""
    start = PromptInput(
        prompt="church bells on sunday", seed=42, denoising=denoising, guidance=guidance
    )
    end = PromptInput(prompt="jazz with piano", seed=123, denoising=denoising, guidance=guidance)
    return [
        GenerationJob(
            start=start,
            end=end,
            alpha=index / max(batch - 1, 1),
            num_inference_steps=steps,
            seed_image_id="og_beat",
        )
        for index in range(batch)
    ]


def unet_step_flops(components: RiffusionComponents, height: int, width: int) -> float:
    """FLOPs of one UNet forward at batch 2 (one clip's guided step)."""
    device, dtype = components.device, components.dtype
    latents = torch.randn(2, 4, height // 8, width // 8, device=device, dtype=dtype)
    timesteps = torch.full((2,), 500.0, device=device)
    text = torch.randn(
        2, 77, components.text_encoder.config.hidden_size, device=device, dtype=dtype
    )
    with torch.inference_mode():
        return count_flops(lambda: components.unet(latents, timesteps, encoder_hidden_states=text))


def vae_flops(components: RiffusionComponents, height: int, width: int) -> float:
    device, dtype = components.device, components.dtype
    image = torch.randn(1, 3, height, width, device=device, dtype=dtype)
    latents = torch.randn(1, 4, height // 8, width // 8, device=device, dtype=dtype)
    with torch.inference_mode():
        return count_flops(lambda: components.vae.encode(image)) + count_flops(
            lambda: components.vae.decode(latents)
        )


COST_REPEATS = 5


def call_costs_ms(calls: Mapping[int, Callable[[], Any]], device: torch.device) -> dict[str, float]:
    """{items: call} -> {items: median ms} (JSON keys), each after its own warm-up call."""
    return {
        str(items): round(timed(call, device, COST_REPEATS) * 1000, 3)
        for items, call in calls.items()
    }


def unet_costs(pipeline: RiffusionPipeline, batches: list[int]) -> dict[str, float]:
    """The backend's UNet forward at 2 x batch samples (a batch's guided step), in ms."""
    components = pipeline.components
    device, dtype = components.device, components.dtype
    hidden = components.text_encoder.config.hidden_size

    def forward(samples: int) -> Callable[[], Any]:
        latents = torch.randn(samples, 4, 64, 64, device=device, dtype=dtype)
        timesteps = torch.full((samples,), 500.0, device=device)
        text = torch.randn(samples, 77, hidden, device=device, dtype=dtype)
        return lambda: pipeline.unet_forward(latents, timesteps, text)

    with torch.inference_mode():
        return call_costs_ms({2 * b: forward(2 * b) for b in batches}, device)


def postprocessing_costs(
    pipeline: RiffusionPipeline, library: SeedImageLibrary, batches: list[int]
) -> dict[str, dict[str, float]]:
    """VAE encode (seed images), VAE decode and Griffin-Lim at each batch, in ms: the
    pipeline's own calls, as the engine makes them."""
    components = pipeline.components
    device = components.device
    vae = components.vae
    seed = pixels_to_model_input(library.load("og_beat", kind="seed")).to(device, vae.dtype)
    latents = torch.randn(max(batches), 4, 64, 64, device=device)  # as the engine's
    with torch.inference_mode():
        pixels = pipeline.decode_pixels(latents)  # (B, 3, 512, 512) uint8
        encode = {b: partial(vae.encode, seed.expand(b, -1, -1, -1)) for b in batches}
        decode = {b: partial(pipeline.decode_pixels, latents[:b]) for b in batches}
        griffin_lim = {
            b: partial(
                pipeline.griffin_lim,
                pixels[:b],
                [torch.Generator("cpu").manual_seed(i) for i in range(b)],  # as `finish`
            )
            for b in batches
        }
        return {
            "vae_encode_ms": call_costs_ms(encode, device),
            "vae_decode_ms": call_costs_ms(decode, device),
            "griffin_lim_ms": call_costs_ms(griffin_lim, device),
        }


def baseline_diffusers(
    components: RiffusionComponents, library: SeedImageLibrary, args: argparse.Namespace
) -> float:
    """Seconds per clip of the plain diffusers img2img pipeline, batch 1, eager."""
    pipe: Any = StableDiffusionImg2ImgPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=make_scheduler(None, components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    image = library.load("og_beat", kind="seed").convert("RGB")
    generator = torch.Generator("cpu")

    def run() -> None:
        pipe(
            prompt="church bells on sunday",
            image=image,
            strength=args.denoising,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            generator=generator.manual_seed(42),
            output_type="np",
        )

    return timed(run, components.device, args.repeats)


def bench_backend(
    components: RiffusionComponents,
    backend: str,
    library: SeedImageLibrary,
    args: argparse.Namespace,
    step_flops: float,
    clip_flops: float,
    peak_flops: float | None,
    baseline_s: float,
    post_costs: bool,
) -> list[dict[str, Any]]:
    params = SpectrogramParams(num_griffin_lim_iters=args.griffin_lim_iters)
    pipeline = RiffusionPipeline(
        components,
        unet_backend=backend,  # type: ignore[arg-type]
        seed_images=library,
        spectrogram_params=params,
    )
    device = components.device
    latents = torch.randn(
        2, 4, 64, 64, device=device, dtype=components.dtype
    )  # one clip's guided forward
    timesteps = torch.full((2,), 500.0, device=device)
    text = torch.randn(
        2, 77, components.text_encoder.config.hidden_size, device=device, dtype=components.dtype
    )
    with torch.inference_mode():
        step_s = timed(lambda: pipeline.unet_forward(latents, timesteps, text), device, 5)
    rows = []
    for batch in args.batches:
        jobs = jobs_for(batch, args.steps, args.denoising, args.guidance)

        def run_batch(jobs: list[GenerationJob] = jobs) -> None:
            pipeline.run(jobs)

        batch_s = timed(run_batch, device, args.repeats)
        per_clip_s = batch_s / batch
        row: dict[str, Any] = {
            "backend": backend,
            "batch": batch,
            "unet_step_ms_batch2": round(step_s * 1000, 2),
            "batch_latency_s": round(batch_s, 3),
            "clips_per_s": round(batch / batch_s, 3),
            "speedup_vs_diffusers_baseline": round(baseline_s / per_clip_s, 2),
        }
        if peak_flops:
            floor_s = clip_flops / peak_flops
            row["x_flop_floor"] = round(per_clip_s / floor_s, 2)
            row["efficiency_pct_of_peak"] = round(100 * floor_s / per_clip_s, 1)
            row["unet_step_pct_of_peak"] = round(100 * step_flops / peak_flops / step_s, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # The UNet's cost per call after the batch runs: a compiled backend's buckets are built.
    unet = unet_costs(pipeline, args.batches)
    print(json.dumps({"costs": backend, "unet_step_ms": unet}), flush=True)
    if post_costs:
        try:
            costs: dict[str, Any] = postprocessing_costs(pipeline, library, args.batches)
        except Exception as error:  # reported; the backends' figures still count
            costs = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps({"costs": "postprocessing", **costs}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="local diffusers dir or hub id (cached)")
    parser.add_argument("--tiny", action="store_true", help="tiny model (smoke runs)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--denoising", type=float, default=0.75)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--backends", nargs="+", default=["eager", "traced", "compiled"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--griffin-lim-iters",
        type=int,
        default=SpectrogramParams().num_griffin_lim_iters,
        help="fewer for smoke runs on a CPU",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        components = build_tiny_components(device=device, dtype=dtype)
        args.batches = [b for b in args.batches if b <= 2]
    elif args.model:
        components = load_components(args.model, device=device, dtype=dtype)
    else:
        components = sd15_random_components(device, dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = args.peak_tflops
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    peak_flops = peak_tflops * 1e12 if peak_tflops else None

    library = SeedImageLibrary()
    step_flops = unet_step_flops(components, 512, 512)
    # Steps actually run at this denoising (+1 for PNDM's warm-up step) and one VAE encode+decode.
    unet_steps = int(args.steps * args.denoising) + 1
    clip_flops = unet_steps * step_flops + vae_flops(components, 512, 512)
    print(
        json.dumps(
            {
                "device": device_name,
                "dtype": str(dtype),
                "model": components.model_id,
                "peak_tflops": peak_tflops,
                "unet_tflop_per_step_batch2": round(step_flops / 1e12, 3),
                "clip_tflop": round(clip_flops / 1e12, 2),
                "flop_floor_s": round(clip_flops / peak_flops, 4) if peak_flops else None,
            }
        ),
        flush=True,
    )
    baseline_s = baseline_diffusers(components, library, args)
    print(
        json.dumps(
            {"baseline": "diffusers img2img, batch 1, eager", "clip_s": round(baseline_s, 3)}
        ),
        flush=True,  # a stage killed at its budget keeps what was printed
    )

    results = []
    for backend in args.backends:
        if backend == "traced":
            # Trace for this device/dtype at batch 2 (works for any batch; see unet_backends).
            trace_dir = Path(tempfile.mkdtemp(prefix="riffusion-trace-"))
            trace_unet(components, trace_dir)
            os.environ["RIFFUSION_TRACED_UNET"] = str(trace_dir)
        try:
            results += bench_backend(
                components,
                backend,
                library,
                args,
                step_flops,
                clip_flops,
                peak_flops,
                baseline_s,
                post_costs=backend == args.backends[0],  # the VAE and Griffin-Lim: once
            )
        except Exception as error:  # report and go on: one backend failing must not hide the rest
            print(
                json.dumps({"backend": backend, "error": f"{type(error).__name__}: {error}"}),
                flush=True,
            )
    best = max(results, key=lambda row: row["clips_per_s"], default=None)
    print(json.dumps({"best": best, "baseline_clip_s": round(baseline_s, 3)}))


if __name__ == "__main__":
    main()
