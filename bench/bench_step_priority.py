"""Step-level priority in the engine, on a CPU's cost model, with and without it.

Listeners play clips in real time, each clip submitted due when their buffer would run
dry less a margin, with two clips of lookahead (as serving/sessions.py does);
per-request clients keep three clips in flight back to back, due at their timeout
(the web app). The tiny pipeline's steps are padded to ``--step-per-job-s`` per clip
in the step (a CPU, where a step costs in proportion to its clips) and each clip's
decode and Griffin-Lim to ``--post-s``, between steps as on a CPU, so that the figures
measure the scheduling rather than this machine's other load. Each run: one engine,
the same traffic, ``EngineConfig.step_priority`` on, then off.

    uv run --frozen --all-extras python -m bench.bench_step_priority --seconds 60
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table

from riffusion.engine import Engine, EngineConfig, EngineObserver
from riffusion.pipeline import GeneratedClip, JobState, RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.spectrogram import SpectrogramParams

console = Console()
MARGIN_S = 1.0  # serving/sessions.py's default for encoding and the network
LOOKAHEAD_CLIPS = 2


class CpuPacedPipeline(RiffusionPipeline):
    """Steps last ``step_per_job_s`` per clip in them, decode + Griffin-Lim ``post_s`` a clip."""

    step_per_job_s = 0.1
    post_s = 0.8

    def denoise_step(self, batch: Sequence[JobState]) -> None:
        began = time.perf_counter()
        super().denoise_step(batch)
        time.sleep(max(0.0, self.step_per_job_s * len(batch) - (time.perf_counter() - began)))

    def finish(self, group: Sequence[JobState]) -> list[GeneratedClip]:
        began = time.perf_counter()
        clips = super().finish(group)
        time.sleep(max(0.0, self.post_s * len(group) - (time.perf_counter() - began)))
        return clips


class Parked(EngineObserver):
    def __init__(self) -> None:
        self.job_steps = 0

    def on_parked(self, jobs: int) -> None:
        self.job_steps += jobs


@dataclass
class Listener:
    clips: int = 0
    underruns: list[float] = field(default_factory=list)
    late: int = 0  # clips answered after their due time


def _job(prompt: str, seed: int, steps: int) -> GenerationJob:
    return GenerationJob.model_validate(
        {"start": PromptInput(prompt=prompt, seed=seed), "num_inference_steps": steps, "width": 64}
    )


def _listen(engine: Engine, index: int, steps: int, clip_s: float, until: float) -> Listener:
    """Plays ``clip_s`` clips in real time from the first one's arrival; counts underruns."""
    result = Listener()
    dry_at: float | None = None  # when the buffer runs out (time.monotonic())
    while time.monotonic() < until:
        now = time.monotonic()
        ahead = max(0.0, dry_at - now) if dry_at is not None else 0.0
        if dry_at is not None and ahead >= LOOKAHEAD_CLIPS * clip_s:
            time.sleep(ahead - LOOKAHEAD_CLIPS * clip_s)
            continue
        due_s = max(0.0, ahead - MARGIN_S)
        entry = engine.submit(_job(f"listener {index}", result.clips, steps), 300.0, due_s=due_s)
        entry.future.result(timeout=300)
        arrived = time.monotonic()
        result.late += int(dry_at is not None and arrived > entry.due)
        if dry_at is None:
            dry_at = arrived + clip_s
        elif arrived > dry_at:
            result.underruns.append(arrived - dry_at)
            dry_at = arrived + clip_s
        else:
            dry_at += clip_s
        result.clips += 1
    return result


def _requests(engine: Engine, steps: int, until: float, latencies: list[float]) -> None:
    """One web-app client: a clip at a time, back to back, due at its timeout."""
    seed = 0
    while time.monotonic() < until:
        began = time.monotonic()
        engine.submit(_job("web app", seed, steps), 300.0).future.result(timeout=300)
        latencies.append(time.monotonic() - began)
        seed += 1


def _run(
    pipeline: CpuPacedPipeline,
    priority: bool,
    listeners: int,
    steps: int,
    seconds: float,
    clip_s: float,
) -> dict[str, Any]:
    observer = Parked()
    config = EngineConfig(max_batch_size=8, postprocess="inline", step_priority=priority)
    engine = Engine(pipeline, config, observer)
    # Measure a one-clip and a three-clip step before the traffic (as a served instance
    # has by the time its listeners arrive).
    engine.submit(_job("warm-up", 0, steps)).future.result()
    for entry in [engine.submit(_job("warm-up", i, steps)) for i in range(3)]:
        entry.future.result()
    until = time.monotonic() + seconds
    results = [Listener() for _ in range(listeners)]
    latencies: list[float] = []

    def listen(i: int) -> None:
        results[i] = _listen(engine, i, steps, clip_s, until)

    threads = [threading.Thread(target=listen, args=(i,)) for i in range(listeners)]
    threads += [
        threading.Thread(target=_requests, args=(engine, steps, until, latencies)) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.stop()
    latencies.sort()
    return {
        "priority": priority,
        "listeners": results,
        "requests": len(latencies),
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "parked_job_steps": observer.job_steps,
    }


@click.command()
@click.option("--listeners", default=2, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Denoising steps per clip.")
@click.option("--seconds", default=60.0, show_default=True, help="Traffic per run.")
@click.option("--step-per-job-s", default=0.1, show_default=True)
@click.option("--post-s", default=0.8, show_default=True)
@click.option("--clip-s", default=5.12, show_default=True, help="Audio per clip (seconds).")
def main(
    listeners: int, steps: int, seconds: float, step_per_job_s: float, post_s: float, clip_s: float
) -> None:
    """Listeners beside per-request clips, step priority on and off."""
    torch.set_num_threads(1)  # the pads, not contention for the cores, set the costs
    pipeline = CpuPacedPipeline.load(
        "tiny", device="cpu", spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2)
    )
    assert isinstance(pipeline, CpuPacedPipeline)
    pipeline.step_per_job_s, pipeline.post_s = step_per_job_s, post_s
    table = Table(
        title=f"{listeners} listeners + 3 per-request clips in flight, {seconds:.0f} s, "
        f"{steps} steps, a step {step_per_job_s} s per clip, decode {post_s} s a clip, "
        f"{clip_s} s of audio a clip"
    )
    for column in (
        "step priority",
        "listener clips",
        "underruns",
        "silence s",
        "clips late",
        "requests",
        "request p50 s",
        "request p95 s",
        "parked job-steps",
    ):
        table.add_column(column, justify="right")
    for priority in (False, True):
        run = _run(pipeline, priority, listeners, steps, seconds, clip_s)
        heard: list[Listener] = run["listeners"]
        table.add_row(
            "on" if priority else "off",
            " / ".join(str(r.clips) for r in heard),
            " / ".join(str(len(r.underruns)) for r in heard),
            " / ".join(f"{sum(r.underruns):.1f}" for r in heard),
            " / ".join(str(r.late) for r in heard),
            str(run["requests"]),
            f"{run['p50_s']:.1f}" if run["p50_s"] is not None else "",
            f"{run['p95_s']:.1f}" if run["p95_s"] is not None else "",
            str(run["parked_job_steps"]),
        )
    console.print(table)


if __name__ == "__main__":
    main()
