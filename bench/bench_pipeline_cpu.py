"""CPU benchmark: one batched ``run(jobs)`` vs the same jobs one at a time (tiny model).

The ratio is measured in one process, so it is meaningful on any machine;
absolute times on the tiny model are not. Jobs are a web-app-like mix
(img2img on one seed image, alpha walking) so caches are warm after the first
(untimed) round, as they are in a serving session.

    uv run --frozen --all-extras python bench/bench_pipeline_cpu.py --batch 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from riffusion.models import build_tiny_components
from riffusion.pipeline import RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.spectrogram import SpectrogramParams


def make_jobs(batch: int, steps: int, width: int, seed_image_id: str | None) -> list[GenerationJob]:
    start = PromptInput(prompt="church bells on sunday", seed=42)
    end = PromptInput(prompt="jazz with piano", seed=123)
    alphas = [index / max(batch - 1, 1) for index in range(batch)]
    return [
        GenerationJob(
            start=start,
            end=end,
            alpha=alpha,
            num_inference_steps=steps,
            seed_image_id=seed_image_id,
            width=width,
        )
        for alpha in alphas
    ]


def time_call(fn: object, repeats: int) -> list[float]:
    assert callable(fn)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=512, help="txt2img width (px)")
    parser.add_argument(
        "--seed-image-id", default="og_beat", help="img2img seed image; 'none' for txt2img"
    )
    parser.add_argument("--griffin-lim-iters", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    seed_image_id = None if args.seed_image_id == "none" else args.seed_image_id
    pipeline = RiffusionPipeline(
        build_tiny_components(device="cpu"),
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=args.griffin_lim_iters),
    )
    jobs = make_jobs(args.batch, args.steps, args.width, seed_image_id)
    pipeline.run(jobs)  # warm-up: fills the caches, first-call allocations

    def batched() -> None:
        pipeline.run(jobs)

    def sequential() -> None:
        for job in jobs:
            pipeline.run([job])

    # Interleave the two so machine-load drift hits both alike.
    batched_times, sequential_times = [], []
    for _ in range(args.repeats):
        batched_times += time_call(batched, 1)
        sequential_times += time_call(sequential, 1)
    batched_s, sequential_s = statistics.median(batched_times), statistics.median(sequential_times)

    clips = pipeline.run(jobs[:1])
    stage = {key: round(value, 3) for key, value in clips[0].timings.items()}
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "model": "tiny",
        "batch": args.batch,
        "steps": args.steps,
        "seed_image_id": seed_image_id,
        "width": args.width if seed_image_id is None else "seed image",
        "griffin_lim_iters": args.griffin_lim_iters,
        "batched_s": round(batched_s, 3),
        "sequential_s": round(sequential_s, 3),
        "batched_clips_per_s": round(args.batch / batched_s, 3),
        "sequential_clips_per_s": round(args.batch / sequential_s, 3),
        "speedup_batched_vs_sequential": round(sequential_s / batched_s, 2),
        "single_job_stage_timings_s": stage,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
