"""Real-time serving benchmark: continuous batching vs adaptive batching vs none, in one run.

Open loop, as real listeners are: requests arrive as a Poisson process at a fixed
offered rate whether or not earlier ones are done. Every batching mode
(RIFFUSION_BATCHING; "continuous/thread" also picks RIFFUSION_POSTPROCESS) is served
on 127.0.0.1 at once, and the web app's request (run_inference, seed image og_beat,
denoising 0.75) is offered at fractions of the capacity measured at the start (a
closed-loop burst on the first mode). The modes take turns, window by window, in a
rotating order, so load from outside the benchmark falls on all of them alike and
they see the same arrival times; loads run lightest first, every round of one before
the next (``window_order``). Reports p50/p95/p99 latency, throughput and the
share of clips answered within the real-time deadline (one clip's playing time,
5.12 s at 512 px).

Then the cancellation scenario: more clips than a batch are sent at once and their
clients leave after a few seconds; the model's `riffusion_unet_samples_total` counts
the samples computed for them, and its "completed" share the clips still decoded and
vocoded for nobody: before (adaptive: no cancellation) and after (continuous: waiting
and running jobs dropped within one step, queued post-processing skipped).

    uv run --frozen --all-extras python -m bench.bench_engine --output bench/engine.json
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.bench_service import serve
from load_tests.client import metric_total, prompt_input, wait_idle, web_app_body

console = Console()
MODES = ("continuous", "adaptive", "off")
# Between runs: nothing in flight for IDLE_SETTLE_S (work is counted when it ends).
IDLE_SETTLE_S = 2.0
IDLE_LIMIT_S = 900.0
# "continuous/thread" and "continuous/inline" pick the engine's post-processing mode
# (RIFFUSION_POSTPROCESS); plain "continuous" takes the device's default.


@dataclass
class LoadResult:
    mode: str
    load: float  # fraction of the measured capacity
    offered_rps: float
    requests: int
    ok: int
    throughput_rps: float
    p50_s: float
    p95_s: float
    p99_s: float
    realtime_share: float  # answered 200 within the deadline, of all offered


@dataclass
class AbandonResult:
    mode: str
    abandoned: int
    unet_samples: float  # computed for the abandoned clips (they had no other traffic)
    finished_for_nobody: float  # abandoned clips still decoded and vocoded to the end
    samples_per_clip: float  # a full clip's samples, measured, for scale


def parse_mode(mode: str) -> tuple[str, dict[str, str]]:
    """("continuous", {"RIFFUSION_POSTPROCESS": "thread"}) for "continuous/thread"."""
    batching, _, postprocess = mode.partition("/")
    if batching not in MODES or postprocess not in ("", "thread", "inline"):
        raise click.BadParameter(f"unknown mode {mode!r}", param_hint="--modes")
    return batching, {"RIFFUSION_POSTPROCESS": postprocess} if postprocess else {}


def web_app_request(seed: int, steps: int) -> dict[str, object]:
    """A web-app body whose alpha and seeds follow ``seed``."""
    return web_app_body(
        (seed % 5) / 4,
        prompt_input("church bells on sunday", seed),
        prompt_input("jazz with piano", seed + 1),
        steps,
    )


def poisson(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process at ``rate`` per second."""
    rng, arrivals, at = random.Random(seed), [], 0.0
    while (at := at + rng.expovariate(rate)) < seconds:
        arrivals.append(at)
    return arrivals


async def _post(client: httpx.AsyncClient, body: dict[str, object]) -> tuple[float, int]:
    began = time.perf_counter()
    try:
        response = await client.post("/run_inference/", json=body)
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    return time.perf_counter() - began, status


async def measure_capacity(url: str, steps: int, clips: int) -> float:
    """Clips per second when ``clips`` are sent at once (closed loop, saturated)."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await _post(client, web_app_request(0, steps))  # warm-up: first-call costs
        began = time.perf_counter()
        results = await asyncio.gather(
            *(_post(client, web_app_request(i, steps)) for i in range(clips))
        )
        wall = time.perf_counter() - began
    if any(status != 200 for _, status in results):
        raise click.ClickException(f"capacity run failed: {[s for _, s in results]}")
    return clips / wall


async def open_loop(
    url: str, arrivals: list[float], steps: int, timeout_s: float
) -> tuple[list[tuple[float, int]], float]:
    """Send one request at each arrival time (seconds from now); (latency, status) each."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        began = time.perf_counter()

        async def fire(index: int, at: float) -> tuple[float, int]:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - began)))
            return await _post(client, web_app_request(1000 + index, steps))

        results = await asyncio.gather(*(fire(i, at) for i, at in enumerate(arrivals)))
        return list(results), time.perf_counter() - began


def summarise(
    mode: str,
    load: float,
    rate: float,
    results: list[tuple[float, int]],
    wall_s: float,
    deadline_s: float,
) -> LoadResult:
    ok = np.array([latency for latency, status in results if status == 200])
    percentile = (lambda q: float(np.percentile(ok, q))) if len(ok) else (lambda q: float("nan"))
    return LoadResult(
        mode=mode,
        load=load,
        offered_rps=rate,
        requests=len(results),
        ok=len(ok),
        throughput_rps=len(ok) / wall_s,
        p50_s=percentile(50),
        p95_s=percentile(95),
        p99_s=percentile(99),
        realtime_share=float(np.sum(ok <= deadline_s)) / max(1, len(results)),
    )


def unet_samples(url: str, outcome: str | None = None) -> float:
    """UNet samples counted so far (when jobs leave), of one outcome or all."""
    labels = {"outcome": outcome} if outcome is not None else None
    return metric_total(url, "riffusion_unet_samples_total", labels)


async def _post_once(url: str, body: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _post(client, body)


async def abandon(url: str, clips: int, after_s: float, steps: int) -> None:
    """Send ``clips`` requests at once and close every connection after ``after_s``."""
    async with httpx.AsyncClient(base_url=url, timeout=after_s) as client:
        await asyncio.gather(
            *(_post(client, web_app_request(5000 + i, steps)) for i in range(clips))
        )


def _load_table(results: list[LoadResult], deadline_s: float) -> Table:
    table = Table(title=f"Open loop (Poisson arrivals); real time = answered within {deadline_s} s")
    for column in (
        "mode",
        "load",
        "offered/s",
        "req",
        "ok",
        "thru/s",
        "p50 s",
        "p95 s",
        "p99 s",
        "real-time",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.mode,
            f"{r.load:.0%}",
            f"{r.offered_rps:.3f}",
            str(r.requests),
            str(r.ok),
            f"{r.throughput_rps:.3f}",
            f"{r.p50_s:.2f}",
            f"{r.p95_s:.2f}",
            f"{r.p99_s:.2f}",
            f"{r.realtime_share:.0%}",
        )
    return table


def window_order(
    loads: Sequence[float], rounds: int, modes: Sequence[str]
) -> list[tuple[int, float, list[str]]]:
    """(round, load, the modes in turn) for every window, in the order they run.

    Each window runs every mode back to back on the same arrival times, in an order
    rotated from one window to the next, so load from outside this benchmark falls on
    every mode alike. Every round of a load runs before the next load, lightest first:
    no window follows a heavier one on the same server, because BentoML's adaptive
    batcher carries the mean wait it learned in one window over to the next and holds
    requests at light load for it (docs/benchmarks.md, "Adaptive at 50 % after a 110 %
    window").
    """
    order = []
    for load_index, load in enumerate(sorted(loads)):
        for round_index in range(rounds):
            shift = (round_index + load_index) % len(modes)
            order.append((round_index, load, [*modes[shift:], *modes[:shift]]))
    return order


@click.command()
@click.option("--model", default="tiny", show_default=True, help="RIFFUSION_MODEL to serve.")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option(
    "--loads",
    default="0.5,0.8,1.1",
    show_default=True,
    help="Fractions of capacity ('' for the cancellation scenario only).",
)
@click.option(
    "--seconds", type=float, default=60.0, show_default=True, help="Per load level and round."
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Windows per load level and mode (interleaved across modes).",
)
@click.option("--steps", type=click.IntRange(1, 150), default=20, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--capacity-clips", type=int, default=8, show_default=True)
@click.option(
    "--capacity",
    "given_capacity",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Clips/s that loads are fractions of, instead of measuring it (runs of two trees "
    "offered the same rates).",
)
@click.option("--deadline-s", type=float, default=5.12, show_default=True)
@click.option(
    "--abandon-clips",
    type=int,
    default=16,
    show_default=True,
    help="Clips sent at once and abandoned (more than a batch: some wait).",
)
@click.option("--abandon-after-s", type=float, default=3.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--emulate",
    type=click.Choice(["a10g", "h100", "zero"]),
    default=None,
    help="RIFFUSION_EMULATE: the model's compute timed as this GPU (docs/benchmarks.md).",
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--url",
    "given_urls",
    multiple=True,
    metavar="MODE=URL",
    help="A mode already served at URL (started with bench.bench_service.serve's settings) "
    "instead of serving it here. Repeatable.",
)
def main(
    model: str,
    modes: str,
    loads: str,
    seconds: float,
    rounds: int,
    steps: int,
    max_batch_size: int,
    capacity_clips: int,
    given_capacity: float | None,
    deadline_s: float,
    abandon_clips: int,
    abandon_after_s: float,
    seed: int,
    emulate: str | None,
    output: Path | None,
    given_urls: tuple[str, ...],
) -> None:
    """Latency percentiles, throughput and real-time share per batching mode and load."""
    # SIGTERM unwinds like Ctrl-C, so the servers started below are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    load_list = sorted({float(x) for x in loads.split(",") if x.strip()})
    capacity = 0.0
    load_results: list[LoadResult] = []
    abandon_results: list[AbandonResult] = []
    with contextlib.ExitStack() as servers:
        urls: dict[str, str] = dict(given.split("=", 1) for given in given_urls)
        for mode in mode_list:  # all served at once, so the rounds below can interleave them
            if mode in urls:
                continue
            batching, extra_env = parse_mode(mode)
            if emulate:
                extra_env["RIFFUSION_EMULATE"] = emulate
            console.print(f"serving [bold]{mode}[/] (RIFFUSION_BATCHING={batching} {extra_env})")
            urls[mode] = servers.enter_context(
                serve(model, max_batch_size, batching, extra_env=extra_env)
            )
        if load_list and given_capacity is not None:
            capacity = given_capacity
            console.print(f"capacity (given): {capacity:.3f} clips/s")
        elif load_list:
            capacity = asyncio.run(measure_capacity(urls[mode_list[0]], steps, capacity_clips))
            console.print(f"closed-loop capacity ({mode_list[0]}): {capacity:.3f} clips/s")
        windows: dict[tuple[str, float], list[tuple[list[tuple[float, int]], float]]] = {}
        for round_index, load, turns in window_order(load_list, rounds, mode_list):
            arrivals = poisson(load * capacity, seconds, seed + round_index)
            for mode in turns:
                wait_idle(urls[mode], IDLE_LIMIT_S, IDLE_SETTLE_S)
                results, wall = asyncio.run(open_loop(urls[mode], arrivals, steps, timeout_s=600))
                windows.setdefault((mode, load), []).append((results, wall))
                ok = [latency for latency, status in results if status == 200]
                console.print(
                    f"  round {round_index + 1}, load {load:.0%}, {mode}: {len(results)} sent, "
                    f"{len(ok)} ok, slowest {max(ok, default=float('nan')):.1f} s"
                )
        for mode, load in itertools.product(mode_list, load_list):
            runs = windows[(mode, load)]
            merged = [sample for results, _ in runs for sample in results]
            wall = sum(wall for _, wall in runs)
            load_results.append(summarise(mode, load, load * capacity, merged, wall, deadline_s))
        for mode in mode_list if abandon_clips else []:
            url = urls[mode]
            wait_idle(url, IDLE_LIMIT_S, IDLE_SETTLE_S)
            before, completed_before = unet_samples(url), unet_samples(url, "completed")
            asyncio.run(_post_once(url, web_app_request(4999, steps)))  # one clip, for scale
            per_clip = unet_samples(url) - before
            before, completed_before = unet_samples(url), unet_samples(url, "completed")
            asyncio.run(abandon(url, abandon_clips, abandon_after_s, steps))
            wait_idle(url, IDLE_LIMIT_S, IDLE_SETTLE_S)
            spent = unet_samples(url) - before
            finished = (unet_samples(url, "completed") - completed_before) / per_clip
            abandon_results.append(AbandonResult(mode, abandon_clips, spent, finished, per_clip))
            console.print(
                f"  {mode}: {abandon_clips} clips abandoned after {abandon_after_s} s: "
                f"{spent:.0f} UNet samples spent on them (a clip is {per_clip:.0f}), "
                f"{finished:.0f} decoded and vocoded for nobody"
            )
    if load_results:
        console.print(_load_table(load_results, deadline_s))
    for r in abandon_results:
        console.print(
            f"{r.mode}: {r.unet_samples:.0f} UNet samples on {r.abandoned} abandoned clips "
            f"({r.unet_samples / max(1, r.abandoned * r.samples_per_clip):.0%} of their full "
            f"cost); {r.finished_for_nobody:.0f} of {r.abandoned} finished for nobody"
        )
    by_key = {(r.mode, r.load): r for r in load_results}
    continuous_modes = [m for m in mode_list if m.startswith("continuous")]
    for load in load_list:
        adapt = by_key.get(("adaptive", load))
        for mode in continuous_modes:
            cont = by_key[(mode, load)]
            if adapt and adapt.p95_s:
                console.print(
                    f"load {load:.0%}: {mode} p95 / adaptive p95 "
                    f"= {cont.p95_s / adapt.p95_s:.2f}x, throughput ratio "
                    f"{cont.throughput_rps / max(adapt.throughput_rps, 1e-9):.2f}x"
                )
    load_average = os.getloadavg()
    console.print(f"load average at the end (1, 5, 15 min): {load_average}")
    report = {
        "load_average_at_end": load_average,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "model": model,
        "emulated": emulate,
        "steps": steps,
        "max_batch_size": max_batch_size,
        "capacity_clips_per_s": capacity,
        "deadline_s": deadline_s,
        "loads": [asdict(r) for r in load_results],
        "abandoned": [asdict(r) for r in abandon_results],
    }
    if output is not None:
        output.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
