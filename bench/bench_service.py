"""Service benchmark: throughput and latency with adaptive batching on vs off.

(The real-time engine against both: bench/bench_engine.py.)

Starts `bentoml serve service:Riffusion` (tiny model unless told otherwise) on
127.0.0.1 twice — RIFFUSION_BATCHING=adaptive (batching on) and =off —
and at each concurrency level sends a fixed number of text-to-audio requests
from that many concurrent clients. Reports requests/s, p50/p99 latency, and the
server overhead per request: end-to-end latency minus the pipeline time the
service reports (X-Riffusion-Pipeline-Seconds), with and without queueing.

    uv run --frozen --all-extras python -m bench.bench_service --output bench/results.json
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from load_tests.server import LocalServer

console = Console()


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    requests_per_s: float
    p50_s: float
    p99_s: float
    mean_pipeline_s: float
    mean_queue_s: float
    overhead_s: float  # end-to-end minus pipeline time (includes queueing)
    overhead_ex_queue_s: float  # ... minus queueing too: HTTP, validation, encoding
    mean_batch_size: float


@contextmanager
def serve(
    model: str,
    max_batch_size: int,
    batching: str | None = "adaptive",  # None: the device's default
    timeout_s: float = 300,
    extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[str]:
    """A local server without an API key; yields its base URL once /readyz answers.
    ``log_path``: where its log is kept (by default it goes with its temporary home)."""
    with tempfile.TemporaryDirectory() as home:
        env: dict[str, str | None] = {
            **(extra_env or {}),
            "RIFFUSION_BATCHING": batching,
            "RIFFUSION_MAX_BATCH_SIZE": str(max_batch_size),
            "RIFFUSION_MAX_LATENCY_MS": "600000",
            "RIFFUSION_MAX_CONCURRENCY": "256",
            "RIFFUSION_API_KEY": None,
            "BENTOML_HOME": home,
        }
        log = log_path or Path(home) / "serve.log"
        with LocalServer(log, model, env, timeout_s) as server:
            yield server.url


async def _run_level(
    url: str, concurrency: int, num_requests: int, body: dict[str, object]
) -> tuple[float, list[tuple[float, float, float, int]]]:
    """(wall seconds, [(latency, pipeline, queue, batch size)]) for one concurrency level."""
    samples: list[tuple[float, float, float, int]] = []
    counter = iter(range(num_requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in counter:
            began = time.perf_counter()
            response = await client.post("/text_to_audio", json={**body, "seed": index})
            latency = time.perf_counter() - began
            response.raise_for_status()
            samples.append(
                (
                    latency,
                    float(response.headers["X-Riffusion-Pipeline-Seconds"]),
                    float(response.headers["X-Riffusion-Queue-Seconds"]),
                    int(response.headers["X-Riffusion-Batch-Size"]),
                )
            )

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        began = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - began, samples


def _summarise(
    mode: str, concurrency: int, wall_s: float, samples: list[tuple[float, float, float, int]]
) -> LevelResult:
    latencies = np.array([s[0] for s in samples])
    pipeline = np.array([s[1] for s in samples])
    queue = np.array([s[2] for s in samples])
    return LevelResult(
        mode=mode,
        concurrency=concurrency,
        requests=len(samples),
        requests_per_s=len(samples) / wall_s,
        p50_s=float(np.percentile(latencies, 50)),
        p99_s=float(np.percentile(latencies, 99)),
        mean_pipeline_s=float(pipeline.mean()),
        mean_queue_s=float(queue.mean()),
        overhead_s=float((latencies - pipeline).mean()),
        overhead_ex_queue_s=float((latencies - pipeline - queue).mean()),
        mean_batch_size=statistics.fmean(s[3] for s in samples),
    )


def _table(results: list[LevelResult]) -> Table:
    table = Table(title="Riffusion service: batching on vs off")
    for column in (
        "mode",
        "conc.",
        "req",
        "req/s",
        "p50 s",
        "p99 s",
        "pipeline s",
        "queue s",
        "overhead s",
        "overhead ex-queue ms",
        "batch",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.mode,
            str(r.concurrency),
            str(r.requests),
            f"{r.requests_per_s:.2f}",
            f"{r.p50_s:.2f}",
            f"{r.p99_s:.2f}",
            f"{r.mean_pipeline_s:.2f}",
            f"{r.mean_queue_s:.2f}",
            f"{r.overhead_s:.2f}",
            f"{r.overhead_ex_queue_s * 1000:.0f}",
            f"{r.mean_batch_size:.1f}",
        )
    return table


@click.command()
@click.option("--model", default="tiny", show_default=True, help="RIFFUSION_MODEL to serve.")
@click.option("--concurrency", "levels", multiple=True, type=int, default=(1, 4, 16))
@click.option(
    "--requests-per-level",
    type=int,
    default=0,
    help="Requests at each level (default: max(4, concurrency)).",
)
@click.option("--max-batch-size", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(1, 150), default=4, show_default=True)
@click.option("--duration-s", type=float, default=0.64, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(
    model: str,
    levels: tuple[int, ...],
    requests_per_level: int,
    max_batch_size: int,
    steps: int,
    duration_s: float,
    output: Path | None,
) -> None:
    """Requests/s and p50/p99 latency at each concurrency, batching on vs off."""
    body: dict[str, object] = {
        "prompt": "lofi hip hop beat",
        "num_inference_steps": steps,
        "duration_s": duration_s,
        "format": "wav",
    }
    results: list[LevelResult] = []
    for mode, batching in (("batching on", "adaptive"), ("batching off", "off")):
        console.print(f"[bold]{mode}[/] (RIFFUSION_BATCHING={batching})")
        with serve(model, max_batch_size, batching) as url:
            asyncio.run(_run_level(url, 1, 2, body))  # warm-up: first-call costs
            for concurrency in levels:
                num_requests = requests_per_level or max(4, concurrency)
                wall_s, samples = asyncio.run(_run_level(url, concurrency, num_requests, body))
                results.append(_summarise(mode, concurrency, wall_s, samples))
                console.print(
                    f"  concurrency {concurrency}: {results[-1].requests_per_s:.2f} req/s"
                )
    console.print(_table(results))
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "model": model,
        "steps": steps,
        "duration_s": duration_s,
        "max_batch_size": max_batch_size,
        "results": [asdict(r) for r in results],
    }
    if output is not None:
        output.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
