"""What each batching mode can reach under a GPU cost model, in virtual time.

The served open loop (``bench.bench_engine --emulate``) measures the real stack; this
asks what no serving stack can change: given the emulated GPU's cost model
(``riffusion.emulation.PROFILES``) and the same Poisson arrivals, how fast can each
schedule answer? Only the device's time is counted (no HTTP, encoding or CPU work), so
the figures are lower bounds on the served ones. Schedules:

1. ``continuous``: the engine's own rules, in virtual time: waiting jobs admitted
   earliest due first into free slots (``--max-batch-size``), each step planned by
   ``riffusion.step_plan.plan_step`` (the engine's code, with the cost model as its
   measured costs), finished clips decoded and vocoded together on the same device
   timeline before the next step (one CUDA stream);
2. ``adaptive``: an ideal request-level batcher: whenever the device is free it takes
   every waiting request (up to the batch size) and runs the batch to its end;
3. ``adaptive/cork``: BentoML 1.4's ``CorkDispatcher`` rule, as ``adaptive`` serves:
   with the device free it still holds a batch while ``n * (wn + dt + a)`` is at most
   0.95 of the mean wait its last 50 batches had (``n`` requests waiting, ``wn`` the
   newest one's wait, ``a`` the fitted seconds per request), refitting every 5 s (its
   start-up training simplified to nine batches of one);
4. ``off``: one clip at a time, first come first served.

Every clip is the web app's (a 64 x 64 latent, 37 steps: 50 at denoising 0.75, its seed
image VAE-encoded at admission: each clip has its own seed), due 5.12 s after it
arrives. Loads are fractions of ``--capacity`` (default: the cost
model's, full batches back to back), so ``--capacity 2.36`` offers what the served
H100 runs offered.

    uv run --frozen --all-extras python -m bench.sim_schedules --profile h100 --capacity 2.36
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.bench_engine import poisson  # the served runs' arrivals
from riffusion.emulation import PROFILES, REFERENCE_LATENT_AREA, AcceleratorProfile, Cost
from riffusion.step_plan import plan_step

console = Console()
CLIP_S = 5.12  # a web-app clip is due within its own length
LATENT_AREA = REFERENCE_LATENT_AREA  # the web app's 512 x 512 px clip
SCHEDULES = ("continuous", "adaptive", "adaptive/cork", "off")
CORK_TICK_S = 0.001  # CorkDispatcher.TICKET_INTERVAL
CORK_KEPT = 50  # Optimizer.N_KEPT_SAMPLE
CORK_SKIPPED = 2  # Optimizer.N_SKIPPED_SAMPLE
CORK_REFRESH_S = 5.0  # Optimizer.INTERVAL_REFRESH_PARAMS
CORK_TRAINING = 9  # batches of one the dispatcher sends first, to fit its line


@dataclass(frozen=True)
class DeviceCosts:
    """Seconds of the web app's clips on one device (``step_plan.Costs``)."""

    unet: Cost  # per UNet sample (two per job: classifier-free guidance)
    postprocess: Cost  # VAE decode + Griffin-Lim, per clip
    encode: Cost  # the seed image's VAE encode, per clip at admission (each has its own seed)

    @classmethod
    def of(cls, profile: AcceleratorProfile) -> DeviceCosts:
        decode, vocode = profile.vae_decode, profile.griffin_lim
        return cls(
            unet=profile.unet_step,
            postprocess=Cost(
                decode.fixed_s + vocode.fixed_s, decode.per_item_s + vocode.per_item_s
            ),
            encode=profile.vae_encode,
        )

    def step_s(self, work: int) -> float:
        return self.unet.seconds(2 * work // LATENT_AREA) if work else 0.0

    def postprocess_s(self, work: int) -> float:
        return self.postprocess.seconds(work // LATENT_AREA) if work else 0.0

    def admit_s(self) -> float:
        return self.encode.seconds(1)

    def batch_s(self, jobs: int, steps: int) -> float:
        """A request-level batch of ``jobs`` clips, from their admission to their answers."""
        work = jobs * LATENT_AREA
        return jobs * self.admit_s() + steps * self.step_s(work) + self.postprocess_s(work)


@dataclass
class Clip:
    """A web-app clip in virtual time (``step_plan.Plannable``)."""

    arrived: float
    steps_left: int
    answered: float = float("nan")
    promised: bool = False
    work: int = LATENT_AREA

    @property
    def due(self) -> float:
        return self.arrived + CLIP_S

    @property
    def deadline(self) -> float:
        return float("inf")  # the benchmark's requests wait as long as it takes

    @property
    def rank(self) -> tuple[bool, float]:
        return (not self.promised, self.due)


def continuous(arrivals: Sequence[float], costs: DeviceCosts, steps: int, slots: int) -> list[Clip]:
    """The engine's rules (module docstring, 1.); every clip, answered."""
    clips = [Clip(at, steps) for at in arrivals]
    waiting: list[tuple[float, int]] = []  # (due, index): earliest due first
    running: list[Clip] = []
    clock, upcoming = 0.0, iter(enumerate(clips))
    arrival = next(upcoming, None)
    while arrival or waiting or running:
        while arrival and arrival[1].arrived <= clock:
            heapq.heappush(waiting, (arrival[1].due, arrival[0]))
            arrival = next(upcoming, None)
        while waiting and len(running) < slots:
            running.append(clips[heapq.heappop(waiting)[1]])
            clock += costs.admit_s()
        if not running:
            clock = arrival[1].arrived if arrival else clock
            continue
        stepped = plan_step(running, clock, costs, False, backlog=bool(waiting)).stepped
        clock += costs.step_s(sum(clip.work for clip in stepped))
        for clip in stepped:
            clip.steps_left -= 1
        done = [clip for clip in running if clip.steps_left == 0]
        if done:
            clock += costs.postprocess_s(sum(clip.work for clip in done))
            for clip in done:
                clip.answered = clock
            running = [clip for clip in running if clip.steps_left]
    return clips


class Cork:
    """BentoML 1.4's ``CorkDispatcher`` hold rule and ``Optimizer`` fit (module docstring)."""

    def __init__(self, max_latency_s: float) -> None:
        self.a = min(2.0, max_latency_s * 2.0 / 30)  # seconds per request
        self.b = min(1.0, max_latency_s * 1.0 / 30)  # seconds per batch
        self.mean_wait = 0.0
        self.stats: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=CORK_KEPT
        )
        self.logged = 0
        self.refreshed = -CORK_REFRESH_S

    def release_at(self, queue: Sequence[float], now: float, slots: int) -> float:
        """When a free device takes the queue (``now``, or when the hold rule lets go)."""
        n = len(queue)
        if n >= slots:
            return now
        # Held while n * (wn + dt + a) <= 0.95 * mean wait, wn growing from the newest arrival.
        newest_wait = 0.95 * self.mean_wait / n - CORK_TICK_S - self.a
        return max(now, queue[-1] + newest_wait + CORK_TICK_S)

    def log(self, n: int, wait: float, duration: float, now: float) -> None:
        self.logged += 1
        if self.logged <= CORK_SKIPPED:
            return
        self.stats.append((n, duration, wait))
        if now - self.refreshed >= CORK_REFRESH_S:
            self.refreshed = now
            x = np.array([(size, 1.0) for size, _, _ in self.stats])
            y = np.array([seconds for _, seconds, _ in self.stats])
            a, b = np.linalg.lstsq(x, y, rcond=None)[0]
            self.a, self.b = max(1e-6, float(a)), max(0.0, float(b))
            self.mean_wait = max(0.0, sum(w for _, _, w in self.stats) / len(self.stats))


def adaptive(
    arrivals: Sequence[float],
    costs: DeviceCosts,
    steps: int,
    slots: int,
    cork: Cork | None = None,
) -> list[Clip]:
    """Request-level batches, one at a time (module docstring, 2. and 3.)."""
    clips = [Clip(at, steps) for at in arrivals]
    clock, next_index, batches = 0.0, 0, 0
    while next_index < len(clips):
        clock = max(clock, clips[next_index].arrived)
        if cork is not None and batches >= CORK_TRAINING:
            while True:  # held: until the rule lets go or another request arrives
                window = clips[next_index : next_index + slots]  # arrivals are in order
                queued = [c.arrived for c in window if c.arrived <= clock]
                release = cork.release_at(queued, clock, slots)
                following = next_index + len(queued)
                upcoming = clips[following].arrived if following < len(clips) else float("inf")
                if release < upcoming or len(queued) >= slots:
                    clock = release
                    break
                clock = upcoming
        limit = 1 if cork is not None and batches < CORK_TRAINING else slots
        batch = [c for c in clips[next_index : next_index + limit] if c.arrived <= clock]
        duration = costs.batch_s(len(batch), steps)
        for clip in batch:
            clip.answered = clock + duration
        if cork is not None:
            training = batches < CORK_TRAINING  # BentoML logs a training batch's wait as 0
            wait = 0.0 if training else clock - batch[0].arrived
            cork.log(len(batch), wait, duration, clock + duration)
        clock += duration
        next_index += len(batch)
        batches += 1
    return clips


@dataclass
class ScheduleResult:
    schedule: str
    load: float
    offered_rps: float
    clips: int
    throughput_rps: float
    p50_s: float
    p95_s: float
    p99_s: float
    within_clip_s: float  # answered within 5.12 s of arriving


def summarise(schedule: str, load: float, rate: float, runs: list[list[Clip]]) -> ScheduleResult:
    """One row over several runs (sets of arrivals): throughput is clips over their spans."""
    clips = [clip for run in runs for clip in run]
    latencies = np.array([clip.answered - clip.arrived for clip in clips])
    span = sum(max(c.answered for c in run) - min(c.arrived for c in run) for run in runs)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return ScheduleResult(
        schedule,
        load,
        rate,
        len(clips),
        len(clips) / span,
        float(p50),
        float(p95),
        float(p99),
        float(np.mean(latencies <= CLIP_S)),
    )


def run_schedule(
    name: str, arrivals: Sequence[float], costs: DeviceCosts, steps: int, slots: int
) -> list[Clip]:
    runners: dict[str, Callable[[], list[Clip]]] = {
        "continuous": lambda: continuous(arrivals, costs, steps, slots),
        "adaptive": lambda: adaptive(arrivals, costs, steps, slots),
        "adaptive/cork": lambda: adaptive(arrivals, costs, steps, slots, Cork(600.0)),
        "off": lambda: continuous(arrivals, costs, steps, 1),
    }
    return runners[name]()


def capacity_of(costs: DeviceCosts, steps: int, slots: int) -> float:
    """Clips per second with full batches back to back."""
    return slots / costs.batch_s(slots, steps)


def _table(results: list[ScheduleResult]) -> Table:
    table = Table(title="device time only (lower bounds on the served figures)")
    for column in ("schedule", "load", "offered/s", "clips", "throughput/s"):
        table.add_column(column)
    for column in ("p50 s", "p95 s", "p99 s", "within 5.12 s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.schedule,
            f"{r.load:.0%}",
            f"{r.offered_rps:.3f}",
            str(r.clips),
            f"{r.throughput_rps:.3f}",
            f"{r.p50_s:.2f}",
            f"{r.p95_s:.2f}",
            f"{r.p99_s:.2f}",
            f"{r.within_clip_s:.0%}",
        )
    return table


@click.command()
@click.option("--profile", type=click.Choice(["a10g", "h100"]), default="h100", show_default=True)
@click.option("--schedules", default=",".join(SCHEDULES), show_default=True)
@click.option("--loads", default="0.5,0.8,1.1", show_default=True, help="Fractions of capacity.")
@click.option(
    "--capacity",
    type=float,
    default=None,
    help="Clips/s the loads are fractions of [default: the cost model's, full batches].",
)
@click.option("--seconds", type=float, default=3600.0, show_default=True, help="Virtual time.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--clip-steps", type=click.IntRange(min=1), default=37, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--unet",
    default=None,
    metavar="FIXED_MS,PER_SAMPLE_MS",
    help="Another UNet step cost than the profile's, to see where the schedules part.",
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(
    profile: str,
    schedules: str,
    loads: str,
    capacity: float | None,
    seconds: float,
    seeds: int,
    clip_steps: int,
    max_batch_size: int,
    unet: str | None,
    output: Path | None,
) -> None:
    """Latency percentiles per schedule and load, every schedule on the same arrivals."""
    names = [name.strip() for name in schedules.split(",") if name.strip()]
    unknown = set(names) - set(SCHEDULES)
    if unknown:
        raise click.BadParameter(f"unknown {sorted(unknown)}; choose from {SCHEDULES}")
    costs = DeviceCosts.of(PROFILES[profile])
    if unet:
        try:
            fixed_ms, per_sample_ms = (float(part) for part in unet.split(","))
        except ValueError:
            raise click.BadParameter("give FIXED_MS,PER_SAMPLE_MS", param_hint="--unet") from None
        costs = dataclasses.replace(costs, unet=Cost(fixed_ms / 1e3, per_sample_ms / 1e3))
    model_capacity = capacity_of(costs, clip_steps, max_batch_size)
    base = capacity or model_capacity
    console.print(
        f"{profile}: UNet {costs.unet.fixed_s * 1e3:.2f} ms + {costs.unet.per_item_s * 1e3:.2f} "
        f"ms per sample; cost-model capacity {model_capacity:.3f} clips/s; loads of {base:.3f}"
    )
    results = []
    for load, name in itertools.product([float(x) for x in loads.split(",") if x], names):
        runs = [
            run_schedule(
                name, poisson(load * base, seconds, seed), costs, clip_steps, max_batch_size
            )
            for seed in range(seeds)
        ]
        results.append(summarise(name, load, load * base, runs))
    console.print(_table(results))
    by_key = {(r.schedule, r.load): r for r in results}
    for r in results:
        for baseline in ("adaptive", "adaptive/cork"):
            other = by_key.get((baseline, r.load))
            if r.schedule == "continuous" and other:
                console.print(
                    f"load {r.load:.0%}: continuous p95 / {baseline} p95 = "
                    f"{r.p95_s / other.p95_s:.2f}x"
                )
    if output is not None:
        report = {
            "profile": profile,
            "unet_ms": [costs.unet.fixed_s * 1e3, costs.unet.per_item_s * 1e3],
            "capacity_clips_per_s": base,
            "results": [asdict(r) for r in results],
        }
        output.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
