"""How many ``num_inference_steps`` fit in the riffusion web app's 60 s proxy timeout.

The app's ``/api/server`` proxy aborts a request after 60 s. This runs the web
app's request (og_beat, denoising 0.75, guidance 7, start and end prompts) on the
full-size SD1.5 architecture (random weights: the same compute as the real
checkpoint) at two step counts on this machine, splits each clip into a fixed
part (text, VAE encode and decode, Griffin-Lim) and a per-denoising-step part,
and prints the largest ``num_inference_steps`` whose clip stays within the
budget for one listener with nothing else running (img2img runs
``int(steps x denoising)`` of them). Add the service's own time (JPEG/MP3
encoding, well under a second) and queueing behind other listeners on top.

    uv run --frozen --all-extras python bench/bench_webapp_budget.py            # this machine
    uv run --frozen --all-extras python bench/bench_webapp_budget.py --tiny     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline_gpu import sd15_random_components

from load_tests.client import prompt_input, web_app_body
from riffusion.api_schemas import RunInferenceRequest
from riffusion.models import build_tiny_components, default_dtype
from riffusion.pipeline import RiffusionPipeline
from riffusion.schemas import MAX_STEPS

PROXY_TIMEOUT_S = 60.0
DENOISING = 0.75


def web_app_job(steps: int) -> RunInferenceRequest:
    return RunInferenceRequest.model_validate(
        web_app_body(
            0.25,
            prompt_input("church bells", 42, DENOISING, 7.0),
            prompt_input("jazz with piano", 43, DENOISING, 7.0),
            steps,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model (smoke runs)")
    parser.add_argument("--steps", type=int, nargs=2, default=[4, 8], metavar=("LOW", "HIGH"))
    parser.add_argument("--budget-s", type=float, default=PROXY_TIMEOUT_S)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device)
    components = (
        build_tiny_components(device=device, dtype=dtype)
        if args.tiny
        else sd15_random_components(device, dtype)
    )
    pipeline = RiffusionPipeline(components)
    low, high = args.steps
    pipeline.run([web_app_job(low).to_job()])  # warm-up: caches the seed image's latents

    seconds: dict[int, float] = {}
    for steps in (low, high):
        began = time.perf_counter()
        [clip] = pipeline.run([web_app_job(steps).to_job()])
        seconds[steps] = time.perf_counter() - began
        print(f"{steps} steps: {seconds[steps]:.1f} s {clip.timings}", file=sys.stderr)
    denoised = {steps: int(steps * DENOISING) for steps in seconds}
    per_step = (seconds[high] - seconds[low]) / (denoised[high] - denoised[low])
    fixed = seconds[low] - denoised[low] * per_step
    fitting = [
        steps
        for steps in range(1, MAX_STEPS + 1)
        if fixed + int(steps * DENOISING) * per_step <= args.budget_s
    ]
    print(
        json.dumps(
            {
                "device": str(device),
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "model": components.model_id,
                "dtype": str(dtype).removeprefix("torch."),
                "clip_seconds": seconds,
                "fixed_seconds": round(fixed, 2),
                "seconds_per_denoising_step": round(per_step, 2),
                "budget_s": args.budget_s,
                "max_num_inference_steps": max(fitting) if fitting else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
