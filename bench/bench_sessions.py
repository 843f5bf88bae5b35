"""Listener sessions on a served instance: admission, underruns, and a prompt change.

Four scenarios, each on its own fresh server (tiny model, the project's seed images,
5.12 s clips), every listener a ``SessionListener`` playing in real time on a thread:

1. ramp: a new session listener every ``--ramp-every`` seconds up to ``--listeners``;
   each admitted one listens to the end of the run. Reports, per listener, admitted or
   refused (and how fast the refusal came, with its retry hint), clips and underruns.
   Target: admitted listeners 0 underruns; excess listeners refused within 100 ms.
2. burst: one listener, then the other ``--listeners`` - 1 all at once ``--burst-after``
   seconds later, as a replica just scaled out sees them (its engine has measured its
   first listener's steps, one clip at a time, and nothing larger). Same report and
   target as the ramp (not run by default).
3. mixed: ``--mixed-sessions`` session listeners beside web-app-style per-request
   traffic (``/run_inference/`` with up to three requests in flight, back to back):
   the session listeners must keep 0 underruns.
4. steer: one listener sends a new prompt after its second clip; reports the time to
   the first clip carrying it (sent by the server) and to when it is heard (that
   clip's start in the listener's playback).

    uv run --frozen --all-extras python -m bench.bench_sessions --output bench/sessions.json
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from bench.bench_engine import web_app_request
from bench.bench_service import serve
from load_tests.client import metric_total
from load_tests.session_client import SessionListener

console = Console()


@dataclass
class ListenerResult:
    index: int
    joined_at_s: float
    accepted: bool
    open_ms: float
    retry_after_s: float | None = None
    refused_message: str = ""  # the server's reason, when refused
    clips: int = 0
    underruns: list[float] = field(default_factory=list)
    first_clip_s: float | None = None
    # Per clip: due_in_s when asked, asked_to_sent_s, and the model service's timings.
    clip_timings: list[dict[str, float]] = field(default_factory=list)
    ended_by: str = ""  # client (the run's end), closed, reconnect
    errors: list[dict[str, Any]] = field(default_factory=list)  # the server's error messages


def _listen(url: str, index: int, steps: int, until: float, result: ListenerResult) -> None:
    listener = SessionListener(
        url, {"prompt": "lofi beat", "seed": index, "num_inference_steps": steps}
    )
    try:
        answer = listener.open()
        result.accepted = answer.get("type") == "accepted"
        result.open_ms = listener.report.open_s * 1000
        result.retry_after_s = answer.get("retry_after_s")
        result.refused_message = listener.report.refused_message
        if result.accepted:
            for clip in listener.clips(seconds=max(0.0, until - time.monotonic())):
                result.clip_timings.append({"due_in_s": clip["due_in_s"], **clip["timings"]})
    finally:
        listener.close()
        result.clips = listener.report.clips
        result.underruns = listener.report.underruns
        result.first_clip_s = listener.report.first_clip_s
        result.ended_by = listener.report.ended_by
        result.errors = listener.report.errors


def _run_listeners(
    url: str, joins_s: list[float], steps: int, seconds: float
) -> list[ListenerResult]:
    """A listener joining at each of ``joins_s`` (seconds from now, in order)."""
    began = time.monotonic()
    until = began + seconds
    results: list[ListenerResult] = []
    threads = []
    for index, join_s in enumerate(joins_s):
        wake = began + join_s
        time.sleep(max(0.0, wake - time.monotonic()))
        result = ListenerResult(index, round(time.monotonic() - began, 1), False, 0.0)
        results.append(result)
        thread = threading.Thread(target=_listen, args=(url, index, steps, until, result))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return results


def _per_request_traffic(
    url: str, steps: int, stop: threading.Event, out: dict[str, Any], delay_s: float = 0.0
) -> None:
    """Web-app style: up to three /run_inference/ requests in flight, back to back,
    from ``delay_s`` on."""
    out.update(requests=0, failures=0, latencies=[])
    if stop.wait(delay_s):
        return
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def one(seed: int) -> None:
        nonlocal failures
        while not stop.is_set():
            began = time.perf_counter()
            try:
                response = httpx.post(
                    f"{url}/run_inference/", json=web_app_request(seed, steps), timeout=120
                )
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - began)
                else:
                    failures += 1
            seed += 3

    workers = [threading.Thread(target=one, args=(seed,)) for seed in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.update(requests=len(latencies), failures=failures, latencies=latencies)


def _steer(url: str, steps: int) -> dict[str, float]:
    listener = SessionListener(
        url, {"prompt": "lofi beat", "seed": 1, "num_inference_steps": steps}
    )
    asked: float | None = None
    try:
        assert listener.open()["type"] == "accepted"
        for clip in listener.clips(count=8):
            now = time.monotonic()
            if clip["index"] == 1:
                listener.steer("church bells on sunday")
                asked = now
            elif asked is not None and clip["end"]["prompt"] == "church bells on sunday":
                heard_in_s = clip["buffer_ahead_s"] + clip["timings"]["asked_to_sent_s"]
                return {
                    "to_first_clip_s": round(now - asked, 2),
                    "until_heard_s": round(now - asked + max(0.0, heard_in_s - 5.12), 2),
                    "clip_index": clip["index"],
                }
    finally:
        listener.close()
    raise RuntimeError("the steer never showed")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def _table(title: str, results: list[ListenerResult]) -> None:
    table = Table(title=title)
    for column in (
        "listener",
        "joined s",
        "admitted",
        "open ms",
        "retry s",
        "clips",
        "underruns",
        "silence s",
        "ended by",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.index),
            f"{r.joined_at_s:.0f}",
            "yes" if r.accepted else "refused",
            f"{r.open_ms:.0f}",
            "" if r.retry_after_s is None else f"{r.retry_after_s:.0f}",
            str(r.clips),
            str(len(r.underruns)),
            f"{sum(r.underruns):.1f}",
            r.ended_by + (f" ({len(r.errors)} errors)" if r.errors else ""),
        )
    console.print(table)
    for r in results:
        for error in r.errors:
            console.print(f"listener {r.index}: {error}")


@click.command()
@click.option("--model", default="tiny", show_default=True)
@click.option("--steps", default=10, show_default=True, help="Denoising steps per clip.")
@click.option("--listeners", default=5, show_default=True, help="Ramp: listeners in all.")
@click.option("--ramp-every", default=30.0, show_default=True, help="Ramp: seconds between joins.")
@click.option(
    "--burst-after", default=10.0, show_default=True, help="Burst: seconds before the rest join."
)
@click.option("--seconds", default=240.0, show_default=True, help="Length of each scenario.")
@click.option("--mixed-sessions", default=2, show_default=True)
@click.option(
    "--traffic-after",
    default=0.0,
    show_default=True,
    help="Mixed: seconds before the per-request traffic starts (after the listeners joined: "
    "it must not degrade them).",
)
@click.option("--output", type=click.Path(path_type=Path), default=None)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep each scenario's server log here (<scenario>.log).",
)
@click.option("--scenarios", default="ramp,mixed,steer", show_default=True)
@click.option(
    "--batching",
    type=click.Choice(["continuous", "off", "adaptive"]),
    default=None,
    help="RIFFUSION_BATCHING; unset: the device's default (off on a CPU, continuous on a GPU).",
)
@click.option(
    "--emulate",
    type=click.Choice(["a10g", "h100", "zero"]),
    default=None,
    help="RIFFUSION_EMULATE: the model's compute timed as this GPU (docs/benchmarks.md).",
)
def main(
    model: str,
    steps: int,
    listeners: int,
    ramp_every: float,
    burst_after: float,
    seconds: float,
    mixed_sessions: int,
    traffic_after: float,
    output: Path | None,
    log_dir: Path | None,
    scenarios: str,
    emulate: str | None,
    batching: str | None,
) -> None:
    """Sessions: ramp with admission, mixed traffic, prompt change latency."""
    chosen = {name.strip() for name in scenarios.split(",")}

    def logs(scenario: str) -> Path | None:
        return None if log_dir is None else log_dir / f"{scenario}.log"

    env = {"RIFFUSION_EMULATE": emulate} if emulate else {}
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
        "model": model,
        "emulated": emulate,
        "batching": batching or "device default",
        "steps": steps,
    }
    if "ramp" in chosen:
        with serve(model, 8, batching, extra_env=env, log_path=logs("ramp")) as url:
            joins = [index * ramp_every for index in range(listeners)]
            results = _run_listeners(url, joins, steps, seconds)
        _table(f"ramp: a listener every {ramp_every:.0f} s, {seconds:.0f} s", results)
        report["ramp"] = [asdict(r) for r in results]
    if "burst" in chosen:
        with serve(model, 8, batching, extra_env=env, log_path=logs("burst")) as url:
            joins = [0.0] + [burst_after] * (listeners - 1)
            results = _run_listeners(url, joins, steps, seconds)
        title = f"burst: one listener, {listeners - 1} more at {burst_after:.0f} s, {seconds:.0f} s"
        _table(title, results)
        report["burst"] = [asdict(r) for r in results]
    if "mixed" in chosen:
        with serve(model, 8, batching, extra_env=env, log_path=logs("mixed")) as url:
            stop, traffic = threading.Event(), dict[str, Any]()
            thread = threading.Thread(
                target=_per_request_traffic, args=(url, steps, stop, traffic, traffic_after)
            )
            thread.start()
            joins = [index * 5.0 for index in range(mixed_sessions)]
            results = _run_listeners(url, joins, steps, seconds)
            stop.set()
            thread.join()
            # Whether step-level priority acted: job-steps sat out for a job due sooner.
            parked = metric_total(url, "riffusion_engine_parked_job_steps_total")
            traffic["parked_job_steps"] = parked
        _table(
            f"mixed: {mixed_sessions} sessions beside per-request traffic "
            f"(from {traffic_after:.0f} s)",
            results,
        )
        latencies = sorted(traffic.pop("latencies"))
        for name, q in (("p50_s", 0.5), ("p95_s", 0.95)):
            traffic[name] = (
                round(latencies[int(q * (len(latencies) - 1))], 2) if latencies else None
            )
        traffic["per_minute"] = round(traffic["requests"] * 60 / seconds, 1)
        console.print(f"per-request traffic: {traffic}")
        for r in results:
            if r.clip_timings:
                late = [t["asked_to_sent_s"] - t["due_in_s"] for t in r.clip_timings]
                console.print(
                    f"listener {r.index}: clips asked to sent, median "
                    f"{_median([t['asked_to_sent_s'] for t in r.clip_timings]):.1f} s, "
                    f"denoise {_median([t.get('denoise', 0.0) for t in r.clip_timings]):.1f} s; "
                    f"sent after their due time: {sum(x > 0 for x in late)} of {len(late)}"
                )
        report["mixed"] = {"sessions": [asdict(r) for r in results], "per_request": traffic}
    if "steer" in chosen:
        with serve(model, 8, batching, extra_env=env, log_path=logs("steer")) as url:
            report["steer"] = _steer(url, steps)
        console.print(f"steer: {report['steer']}")
    report["load_average_at_end"] = os.getloadavg()
    console.print(f"load average at the end (1, 5, 15 min): {report['load_average_at_end']}")
    if output is not None:
        output.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
