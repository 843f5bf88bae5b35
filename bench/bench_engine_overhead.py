"""The engine's own overhead per denoising step, at 1, 4, 8 and 16 jobs: what runs on
this CPU, what a GPU deployment's host would pay, and (modelled) what its device would.

The UNet forward is replaced by a stand-in that takes a fixed time (default 20 ms;
``--wait``: asleep, or spinning as a host thread waiting for a GPU does) and predicts
zero noise, so what a step takes beyond the stand-in's call is the engine's and the
pipeline's own work: batching the inputs, the scheduler steps, guidance, mask blend,
admission checks and bookkeeping. Text-to-audio jobs, 50 steps,
all submitted together (``Engine.submit_together``: every step is a full batch); the
time between the starts of consecutive steps (``denoise_step`` calls) is the engine
loop's period, and the stand-in's
own call, timed around it at each step, is taken out of it: its zero output and the
wait's overshoot are measured, not assumed, and are not the engine's. The first two
steps and the last are left out; the median over the steps is reported.

Each batch size runs at two latent sizes, alternating in one process, ``--rounds``
times each (the median of the rounds is reported):

1. ``64x64``: the real tensor sizes (512 px). On this CPU the step's elementwise
   arithmetic over (n, 4, 64, 64) runs on the same cores as the engine: this is the
   CPU deployment's figure.
2. ``8x8``: the same pipeline and jobs with the latent grid shrunk 64-fold
   (``vae_scale_factor`` 64): the same code path, the same tensor ops in the same
   order, on 1/64 of the elements, so the arithmetic is negligible and what remains is
   the host's work per step (Python, scheduling, bookkeeping, op dispatch). On a GPU
   the arithmetic runs on the device, asynchronously to the host, so this is what a
   GPU deployment's CPU pays per step. Post-processing is not part of a step, and
   Griffin-Lim needs 512 mel rows: at 8x8 a finished job gets a placeholder clip.

And, per batch size, the device's share is MODELLED (no GPU runs here): the tensor
ops of a steady full-size step are counted on their way through the dispatcher
(``TorchDispatchMode``; views and allocations are not counted), with the bytes each
reads and writes; their sum over an H100's memory bandwidth (3.35 TB/s for the SXM
part, 2.0 TB/s for PCIe; sources in docs/benchmarks.md) is the time the step's
elementwise kernels would take at full bandwidth, a lower bound.

The target (issue 21) is the overhead as a share of an emulated H100 step at that
batch (``riffusion.emulation``'s H100 profile, two UNet samples per job); the share of
the stand-in's sleep is printed too. Both scheduler-stepping paths can run:
``batched`` (the default: jobs sharing a scheduler kind stepped together) and
``per-job`` (each job's own ``scheduler.step``, the reference path).

    uv run --frozen --all-extras python -m bench.bench_engine_overhead

On a GPU host, ``--device cuda`` runs the same with the latents on the GPU (the engine
on its CPU, the arithmetic queued on the device): the figure that replaces the model.

Prints one JSON row per batch, latent size and path; per batch and path the modelled
device traffic; per path and latent size the fit overhead = a + b x jobs; and a summary
per batch: host overhead against 5 % of the emulated H100 step. Timings on a loaded
machine are noisy; the ratios within one run are what to compare.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import click
import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from riffusion.audio import Audio
from riffusion.emulation import PROFILES
from riffusion.engine import Engine, EngineConfig
from riffusion.models import build_tiny_components
from riffusion.pipeline import GeneratedClip, JobState, RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput, SchedulerName
from riffusion.spectrogram import SpectrogramParams

# Latent size -> the pipeline's vae_scale_factor: 512 px / 8 = 64 rows, / 64 = 8 rows.
LATENT_SIZES = {"64x64": 8, "8x8": 64}
HOST_SIZE = "8x8"
# H100 memory bandwidth, bytes/s (docs/benchmarks.md cites both).
H100_BANDWIDTH = {"sxm": 3.35e12, "pcie": 2.0e12}
TARGET_SHARE = 0.05  # of an emulated H100 step
PATHS = {"per-job": False, "batched": True}  # path -> pipeline.batched_scheduler_steps


class StandInUNet:
    """A UNet forward that takes ``seconds`` and predicts zero noise; times its calls.

    ``wait``: how the engine thread spends those seconds. ``sleep`` gives the core up,
    so the step after it starts on whatever caches other work left (the pessimistic
    case); ``spin`` keeps the core busy, as a host thread does while it waits for a GPU
    in CUDA's default spin-wait (it holds the GIL: no other thread runs in this bench).
    """

    def __init__(self, seconds: float, wait: str = "sleep") -> None:
        self.seconds = seconds
        self.wait = wait
        self.calls: list[tuple[int, float, float]] = []  # (jobs, seconds, CPU seconds)
        self.counter: TrafficCounter | None = None

    def __call__(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        began, began_cpu = time.perf_counter(), time.thread_time()
        if self.counter is not None:
            self.counter.paused = True  # the real UNet's traffic is not the engine's
        if self.wait == "spin":
            until = began + self.seconds
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(self.seconds)
        noise = torch.zeros_like(latents)
        if self.counter is not None:
            self.counter.paused = False
        seconds, cpu = time.perf_counter() - began, time.thread_time() - began_cpu
        self.calls.append((latents.shape[0] // 2, seconds, cpu))
        return noise


class TrafficCounter(TorchDispatchMode):
    """Tensor ops that touch data, and the bytes they read and write, while active."""

    NOT_COUNTED = frozenset(
        {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
        | {"lift_fresh", "detach", "detach_", "set_", "alias"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if not self.paused and not func.is_view and name not in self.NOT_COUNTED:
            reads = [*args, *(value for key, value in kwargs.items() if key != "out")]
            self.ops += 1
            self.bytes += sum(map(tensor_bytes, reads)) + tensor_bytes(out)
        return out


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a list or tuple of them)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(map(tensor_bytes, value))
    return 0


class TimedSteps:
    """Wraps ``pipeline.denoise_step``: when each call began (the engine's step loop comes
    round once per call) and how long it took; counts its traffic (a ``TrafficCounter``
    per call) when ``count`` is set.

    The loop's period is read here rather than from the engine's observer: on CUDA the
    engine reports a step once the device has passed it (riffusion/step_timer.py), a
    step or two late, so its reports do not mark when the host's steps end."""

    def __init__(self, pipeline: RiffusionPipeline, unet: StandInUNet, count: bool) -> None:
        self.step = pipeline.denoise_step
        self.unet = unet
        self.count = count
        self.starts: list[tuple[int, float, float]] = []  # (jobs, perf_counter, CPU time)
        self.seconds: list[tuple[int, float]] = []  # (jobs, seconds of the call)
        self.traffic: list[tuple[int, int]] = []  # (ops, bytes) per call

    def __call__(self, batch: Sequence[JobState]) -> None:
        if self.count:
            with TrafficCounter() as counter:  # on the engine thread, where the step runs
                self.unet.counter = counter
                self.step(batch)
            self.traffic.append((counter.ops, counter.bytes))
            return
        began = time.perf_counter()
        self.starts.append((len(batch), began, time.thread_time()))
        self.step(batch)
        self.seconds.append((len(batch), time.perf_counter() - began))


def steady(values: list[float]) -> float:
    """Median, leaving out the first two and the last (warm-up, the batch finishing)."""
    return statistics.median(values[2:-1] or values)


def placeholder_finish(group: Sequence[JobState]) -> list[GeneratedClip]:
    """``finish`` at 8x8 latents, which Griffin-Lim cannot read: an empty clip per job."""
    return [
        GeneratedClip(
            image=PIL.Image.new("L", (1, 1)),
            audio=Audio(np.zeros((1, 1), dtype=np.float32), 44100),
            timings={},
            latents=state.latents,
            steps=state.num_steps,
        )
        for state in group
    ]


def run_jobs(
    pipeline: RiffusionPipeline,
    jobs: int,
    steps: int,
    scheduler: SchedulerName | None,
    count: bool = False,
) -> tuple[StandInUNet, TimedSteps]:
    """``jobs`` jobs of ``steps`` steps through an engine, submitted together."""
    stand_in: StandInUNet = pipeline.unet_forward  # type: ignore[assignment]
    unet = StandInUNet(stand_in.seconds, stand_in.wait)
    pipeline.unet_forward = unet
    timed = TimedSteps(pipeline, unet, count)
    pipeline.denoise_step = timed  # type: ignore[method-assign]
    engine = Engine(pipeline, EngineConfig(max_batch_size=jobs, postprocess="inline"))
    try:
        entries = engine.submit_together(
            [
                (
                    GenerationJob(
                        start=PromptInput(prompt=f"overhead {index}", seed=index),
                        num_inference_steps=steps,
                        scheduler=scheduler,
                    ),
                    None,
                    None,
                    0.0,
                    None,
                    False,
                )
                for index in range(jobs)
            ]
        )
        for entry in entries:
            if isinstance(entry, Exception):
                raise entry
            entry.future.result(timeout=900)
    finally:
        engine.stop()
        del pipeline.denoise_step  # back to the class's method
    return unet, timed


def measure(
    pipeline: RiffusionPipeline, jobs: int, steps: int, scheduler: SchedulerName | None
) -> dict[str, float]:
    """Seconds per full-batch step of ``jobs`` jobs: the interval between steps, the
    engine's and pipeline's own part of it (the interval less the stand-in's call at
    that step), and its parts (the rest of ``denoise_step`` beyond the UNet call, the
    engine around it, the stand-in beyond its sleep), each the median over the steps."""
    unet, timed = run_jobs(pipeline, jobs, steps, scheduler)
    full = [(at, cpu) for batch, at, cpu in timed.starts if batch == jobs]
    intervals = [later[0] - earlier[0] for earlier, later in itertools.pairwise(full)]
    cpu_intervals = [later[1] - earlier[1] for earlier, later in itertools.pairwise(full)]
    steps_s = [seconds for batch, seconds in timed.seconds if batch == jobs]
    unet_s = [seconds for batch, seconds, _ in unet.calls if batch == jobs]
    unet_cpu = [cpu for batch, _, cpu in unet.calls if batch == jobs]
    # Interval k runs from step k's start to step k + 1's: step k (its UNet call and its
    # denoise_step), then the engine's work until it starts the next.
    return {
        "interval": steady(intervals),
        # everything but the stand-in's call
        "own": steady([i - call for i, call in zip(intervals, unet_s, strict=False)]),
        # the same in the engine thread's CPU time: what its work took, not counting the
        # time other processes on these cores took the CPU from it
        "own_cpu": steady([i - c for i, c in zip(cpu_intervals, unet_cpu, strict=False)]),
        # inputs, guidance, scheduler steps, mask blend
        "pipeline": steady([step - call for step, call in zip(steps_s, unet_s, strict=True)]),
        # admission checks, planning, grouping, bookkeeping, observer
        "engine": steady([i - step for i, step in zip(intervals, steps_s, strict=False)]),
        # the stand-in's zero output and the sleep's overshoot (not the engine's)
        "stand_in_extra": steady([call - unet.seconds for call in unet_s]),
    }


def count_traffic(
    pipeline: RiffusionPipeline, jobs: int, steps: int, scheduler: SchedulerName | None
) -> tuple[int, int]:
    """(tensor ops, bytes) of a steady step of ``jobs`` jobs (past the multistep warm-up)."""
    _, timed = run_jobs(pipeline, jobs, steps, scheduler, count=True)
    ops, moved = zip(*timed.traffic[5:-1], strict=True)
    return int(statistics.median(ops)), int(statistics.median(moved))


def h100_step_ms(jobs: int) -> float:
    """An emulated H100's UNet step for ``jobs`` jobs at 64x64 (two samples per job)."""
    return PROFILES["h100"].unet_step.seconds(2 * jobs) * 1000


@click.command()
@click.option("--batches", default="1,4,8,16", show_default=True)
@click.option("--steps", type=click.IntRange(8, 150), default=50, show_default=True)
@click.option("--unet-ms", type=float, default=20.0, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 10), default=2, show_default=True)
@click.option("--paths", default="batched", show_default=True, help="of: per-job, batched")
@click.option("--sizes", default="64x64,8x8", show_default=True, help="of: 64x64, 8x8 (host)")
@click.option("--device", default="cpu", show_default=True, help="where the latents live")
@click.option(
    "--wait",
    type=click.Choice(["sleep", "spin"]),
    default="sleep",
    show_default=True,
    help="how the stand-in spends its time: the core given up, or kept busy",
)
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
    sizes: str,
    device: str,
    wait: str,
    scheduler: str | None,
) -> None:
    """Overhead per step beyond the UNet, per batch size, latent size and stepping path."""
    torch.set_num_threads(1)  # the engine's own work is what is measured, not BLAS threads
    kind = SchedulerName(scheduler) if scheduler else None
    components = build_tiny_components(device=device)
    size_names = [name.strip() for name in sizes.split(",")]
    path_names = [name.strip() for name in paths.split(",")]
    pipelines: dict[str, RiffusionPipeline] = {}
    for size in LATENT_SIZES:
        pipeline = RiffusionPipeline(
            components, spectrogram_params=SpectrogramParams(num_griffin_lim_iters=1)
        )
        pipeline.vae_scale_factor = LATENT_SIZES[size]
        if size == HOST_SIZE:
            pipeline.finish = placeholder_finish  # type: ignore[method-assign]
        pipeline.unet_forward = StandInUNet(unet_ms / 1000, wait)
        pipelines[size] = pipeline
        for path in path_names:  # one-off costs: coefficient caches, first calls
            pipeline.batched_scheduler_steps = PATHS[path]
            run_jobs(pipeline, 1, steps, kind)
    runs = list(itertools.product(size_names, path_names))
    fits: dict[tuple[str, str], list[tuple[int, float]]] = {run: [] for run in runs}
    for jobs in (int(b) for b in batches.split(",")):
        samples: dict[tuple[str, str], list[dict[str, float]]] = {run: [] for run in runs}
        for _ in range(rounds):  # the runs alternate, so load drifts hit them alike
            for size, path in runs:
                pipelines[size].batched_scheduler_steps = PATHS[path]
                samples[size, path].append(measure(pipelines[size], jobs, steps, kind))
        h100_ms = h100_step_ms(jobs)
        own: dict[tuple[str, str], tuple[float, float]] = {}  # (wall, CPU) ms
        for size, path in runs:
            parts = {
                part: statistics.median(sample[part] for sample in samples[size, path]) * 1000
                for part in samples[size, path][0]
            }
            own[size, path] = parts["own"], parts["own_cpu"]
            fits[size, path].append((jobs, parts["own"]))
            row = {
                "jobs": jobs,
                "latents": size,
                "path": path,
                "wait": wait,
                "step_ms": round(parts["interval"], 3),
                "own_ms": round(parts["own"], 3),
                "own_pct_of_h100_step": round(100 * parts["own"] / h100_ms, 2),
                "own_pct_of_sleep": round(100 * parts["own"] / unet_ms, 2),
                "rounds_own_ms": [round(x["own"] * 1000, 3) for x in samples[size, path]],
                "own_cpu_ms": round(parts["own_cpu"], 3),
                "own_cpu_pct_of_h100_step": round(100 * parts["own_cpu"] / h100_ms, 2),
                "pipeline_ms": round(parts["pipeline"], 3),
                "engine_ms": round(parts["engine"], 3),
                "stand_in_extra_ms": round(parts["stand_in_extra"], 3),
            }
            print(json.dumps(row), flush=True)
        for path in path_names:
            pipeline = pipelines["64x64"]
            pipeline.batched_scheduler_steps = PATHS[path]
            ops, moved = count_traffic(pipeline, jobs, steps, kind)
            device_us = {
                part: moved / bandwidth * 1e6 for part, bandwidth in H100_BANDWIDTH.items()
            }
            print(
                json.dumps(
                    {
                        "jobs": jobs,
                        "path": path,
                        "modelled": "device arithmetic at 64x64, fp32",
                        "tensor_ops": ops,
                        "bytes_per_step": moved,
                        "h100_sxm_us": round(device_us["sxm"], 2),
                        "h100_pcie_us": round(device_us["pcie"], 2),
                    }
                ),
                flush=True,
            )
            if (HOST_SIZE, path) in own:
                host_ms, host_cpu_ms = own[HOST_SIZE, path]
                device_ms = device_us["pcie"] / 1000
                target_ms = TARGET_SHARE * h100_ms
                print(
                    json.dumps(
                        {
                            "jobs": jobs,
                            "path": path,
                            "h100_step_ms": round(h100_ms, 2),
                            "target_ms": round(target_ms, 3),
                            "host_ms": round(host_ms, 3),
                            "host_cpu_ms": round(host_cpu_ms, 3),
                            "host_pct": round(100 * host_ms / h100_ms, 2),
                            "host_cpu_pct": round(100 * host_cpu_ms / h100_ms, 2),
                            "pcie_device_pct": round(100 * device_ms / h100_ms, 3),
                            "met_wall": host_ms + device_ms < target_ms,
                            "met_cpu": host_cpu_ms + device_ms < target_ms,
                        }
                    ),
                    flush=True,
                )
    for (size, path), points in fits.items():
        if len(points) >= 2:
            (first_jobs, first), (last_jobs, last) = points[0], points[-1]
            per_job = (last - first) / (last_jobs - first_jobs)
            fixed = first - per_job * first_jobs
            fit = f"{fixed:.3f} ms + {per_job:.4f} ms x jobs"
            print(json.dumps({"latents": size, "path": path, "fit": fit}))


if __name__ == "__main__":
    main()
