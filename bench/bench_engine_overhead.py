"""The engine's own overhead per denoising step, measured from outside, at 1, 4, 8 and 16 jobs.

The UNet forward is replaced by a fixed sleep (default 20 ms, about an emulated H100
step at a full batch), so what a step takes beyond it is the engine's and the
pipeline's own work: batching the inputs, each job's scheduler step, guidance, mask
blend, admission and bookkeeping. Text-to-audio jobs at 512 px (64x64 latents, the
real tensor sizes), 50 steps, all submitted at once; the time between consecutive
steps is read from the engine's observer, the first two steps and the last are
left out, and the median is reported.

Each batch size is measured with the scheduler steps batched (jobs sharing a
scheduler kind stepped together, the default) and per job (each job's own
``scheduler.step``, the reference path), alternating in one process, ``--rounds``
times each; the median of the rounds is reported per path, with their ratio.

    uv run --frozen --all-extras python -m bench.bench_engine_overhead

Prints, per batch and path: step interval, overhead (interval - sleep) in ms and as a
share of the sleep, and its parts: ``pipeline_ms`` (``denoise_step`` less the UNet
call: batching the inputs, guidance, scheduler steps, mask blend), ``engine_ms`` (the
engine around it) and ``unet_extra_ms`` (the stand-in's zero output, sleep overshoot);
per batch the per-job/batched overhead ratio; per path the fit overhead = a + b x jobs.
Timings on a loaded machine are noisy; the ratios within one run are what to compare.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from collections.abc import Sequence

import click
import torch
from torch import Tensor

from riffusion.engine import Engine, EngineConfig, EngineObserver
from riffusion.models import build_tiny_components
from riffusion.pipeline import JobState, RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput, SchedulerName
from riffusion.spectrogram import SpectrogramParams


class SleepingUNet:
    """A UNet forward that takes ``seconds`` and predicts zero noise; times its calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[float] = []

    def __call__(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        began = time.perf_counter()
        time.sleep(self.seconds)
        noise = torch.zeros_like(latents)
        self.calls.append(time.perf_counter() - began)
        return noise


class TimedSteps:
    """Wraps ``pipeline.denoise_step``: how long each call of a full batch took."""

    def __init__(self, pipeline: RiffusionPipeline, jobs: int) -> None:
        self.step = pipeline.denoise_step
        self.jobs = jobs
        self.seconds: list[float] = []

    def __call__(self, batch: Sequence[JobState]) -> None:
        began = time.perf_counter()
        self.step(batch)
        if len(batch) == self.jobs:
            self.seconds.append(time.perf_counter() - began)


class StepClock(EngineObserver):
    """When each step ended (perf_counter)."""

    def __init__(self) -> None:
        self.ends: list[tuple[int, float]] = []
        self.lock = threading.Lock()

    def on_step(self, batch_size: int, seconds: float, unet_samples: int) -> None:
        with self.lock:
            self.ends.append((batch_size, time.perf_counter()))


def steady(values: list[float]) -> float:
    """Median, leaving out the first two and the last (warm-up, the batch finishing)."""
    return statistics.median(values[2:-1] or values)


def measure(
    pipeline: RiffusionPipeline, jobs: int, steps: int, scheduler: SchedulerName | None = None
) -> dict[str, float]:
    """Seconds per full-batch step of ``jobs`` jobs: the interval between steps, and its
    parts (the rest of ``denoise_step`` beyond the UNet call, the engine around it, the
    stand-in UNet beyond its sleep), each the median over the steps (so they need not
    add up exactly)."""
    clock = StepClock()
    unet = SleepingUNet(pipeline.unet_forward.seconds)  # type: ignore[attr-defined]
    pipeline.unet_forward = unet
    timed = TimedSteps(pipeline, jobs)
    pipeline.denoise_step = timed  # type: ignore[method-assign]
    engine = Engine(pipeline, EngineConfig(max_batch_size=jobs, postprocess="inline"), clock)
    try:
        entries = [
            engine.submit(
                GenerationJob(
                    start=PromptInput(prompt=f"overhead {index}", seed=index),
                    num_inference_steps=steps,
                    scheduler=scheduler,
                )
            )
            for index in range(jobs)
        ]
        for entry in entries:
            entry.future.result(timeout=900)
    finally:
        engine.stop()
        del pipeline.denoise_step  # back to the class's method
    full = [at for batch, at in clock.ends if batch == jobs]
    intervals = [later - earlier for earlier, later in itertools.pairwise(full)]
    steps_s = timed.seconds  # step k + 1 runs within interval k
    unet_s = unet.calls[-len(steps_s) :]
    return {
        "interval": steady(intervals),
        # inputs, guidance, scheduler steps, mask blend
        "pipeline": steady([step - call for step, call in zip(steps_s, unet_s, strict=True)]),
        # admission checks, grouping, bookkeeping, observer
        "engine": steady([i - step for i, step in zip(intervals, steps_s[1:], strict=False)]),
        # the stand-in's zero output and the sleep's overshoot
        "unet_extra": steady([call - unet.seconds for call in unet_s]),
    }


PATHS = {"per-job": False, "batched": True}  # path -> pipeline.batched_scheduler_steps


@click.command()
@click.option("--batches", default="1,4,8,16", show_default=True)
@click.option("--steps", type=click.IntRange(5, 150), default=50, show_default=True)
@click.option("--unet-ms", type=float, default=20.0, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 10), default=2, show_default=True)
@click.option("--paths", default="per-job,batched", show_default=True, help="of: per-job, batched")
@click.option("--device", default="cpu", show_default=True, help="where the latents live")
@click.option(
    "--scheduler",
    type=click.Choice([name.value for name in SchedulerName]),
    default=None,
    help="[default: the checkpoint's own, PNDM]",
)
def main(
    batches: str,
    steps: int,
    unet_ms: float,
    rounds: int,
    paths: str,
    device: str,
    scheduler: str | None,
) -> None:
    """Overhead per step beyond the UNet, per batch size and scheduler-stepping path."""
    torch.set_num_threads(1)  # the engine's own work is what is measured, not BLAS threads
    pipeline = RiffusionPipeline(
        build_tiny_components(device=device),
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=1),
    )
    pipeline.unet_forward = SleepingUNet(unet_ms / 1000)
    path_names = [name.strip() for name in paths.split(",")]
    fits: dict[str, list[tuple[int, float]]] = {name: [] for name in path_names}
    for jobs in (int(b) for b in batches.split(",")):
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in path_names}
        for _ in range(rounds):  # the paths alternate, so load drifts hit both alike
            for name in path_names:
                pipeline.batched_scheduler_steps = PATHS[name]
                kind = SchedulerName(scheduler) if scheduler else None
                samples[name].append(measure(pipeline, jobs, steps, kind))
        overheads: dict[str, float] = {}
        for name in path_names:
            parts = {
                part: statistics.median(sample[part] for sample in samples[name]) * 1000
                for part in samples[name][0]
            }
            overheads[name] = parts["interval"] - unet_ms
            fits[name].append((jobs, overheads[name]))
            row = {
                "jobs": jobs,
                "path": name,
                "step_ms": round(parts["interval"], 2),
                "overhead_ms": round(overheads[name], 2),
                "overhead_pct_of_unet": round(100 * overheads[name] / unet_ms, 1),
                "rounds_ms": [round(x["interval"] * 1000 - unet_ms, 2) for x in samples[name]],
                "pipeline_ms": round(parts["pipeline"], 2),
                "engine_ms": round(parts["engine"], 2),
                "unet_extra_ms": round(parts["unet_extra"], 2),
            }
            print(json.dumps(row), flush=True)
        if len(overheads) == 2 and overheads.get("batched", 0) > 0:
            ratio = overheads["per-job"] / overheads["batched"]
            print(json.dumps({"jobs": jobs, "overhead_per_job_over_batched": round(ratio, 2)}))
    for name, points in fits.items():
        if len(points) >= 2:
            (first_jobs, first), (last_jobs, last) = points[0], points[-1]
            per_job = (last - first) / (last_jobs - first_jobs)
            fixed = first - per_job * first_jobs
            print(json.dumps({"path": name, "fit": f"{fixed:.2f} ms + {per_job:.3f} ms x jobs"}))


if __name__ == "__main__":
    main()
