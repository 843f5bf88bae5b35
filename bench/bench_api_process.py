"""The API service's process: start-up and memory, this checkout against another.

For each checkout (``--before DIR``, e.g. an older commit's ``git archive``, then this
one), with the tiny model:

1. import time of ``service.py`` in a fresh interpreter (what an API worker pays
   before it serves), median of ``--imports`` runs;
2. ``bentoml serve``, then the API worker's RSS once ready and after one web-app
   request (1 step), and whether torch's library is mapped into it.

Prints one line per checkout and the ratios after/before. Both run in this
environment (same packages), one after the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from load_tests.server import REPO_ROOT, LocalServer

WEB_APP_BODY = {"start": {"prompt": "bells", "seed": 1}, "num_inference_steps": 1}


def import_seconds(repo: Path, home: Path, runs: int) -> float:
    env = {**os.environ, "RIFFUSION_MODEL": "tiny", "BENTOML_HOME": str(home)}
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import service"], cwd=repo, env=env, check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def api_worker(server: LocalServer) -> psutil.Process:
    assert server.process is not None
    for child in psutil.Process(server.process.pid).children(recursive=True):
        command = child.cmdline()
        if "--service-name" in command and command[command.index("--service-name") + 1] == (
            "riffusion"
        ):
            return child
    raise SystemExit("no API worker found")


def measure(repo: Path, runs: int) -> dict[str, float | bool]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        import_s = import_seconds(repo, home, runs)
        env = {"BENTOML_HOME": str(home / "serve"), "RIFFUSION_API_KEY": None}
        with LocalServer(home / "serve.log", env=env, repo=repo) as server:
            worker = api_worker(server)
            ready_mb = worker.memory_info().rss / 2**20
            answer = httpx.post(f"{server.url}/run_inference/", json=WEB_APP_BODY, timeout=300)
            answer.raise_for_status()
            served_mb = worker.memory_info().rss / 2**20
            torch_mapped = any("libtorch" in m.path for m in worker.memory_maps())
    return {
        "import_s": import_s,
        "ready_mb": ready_mb,
        "served_mb": served_mb,
        "torch_mapped": torch_mapped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to compare against")
    parser.add_argument("--imports", type=int, default=3, help="import runs per checkout")
    args = parser.parse_args()
    checkouts = [("before", args.before)] if args.before else []
    checkouts.append(("after", REPO_ROOT))
    results = {}
    for label, repo in checkouts:
        results[label] = measure(repo, args.imports)
        r = results[label]
        print(
            f"{label:6s} import service.py {r['import_s']:.2f} s | API worker RSS ready "
            f"{r['ready_mb']:.0f} MB, after a request {r['served_mb']:.0f} MB | "
            f"torch mapped: {r['torch_mapped']}",
            flush=True,
        )
    if "before" in results:
        b, a = results["before"], results["after"]
        print(
            f"after/before: import {a['import_s'] / b['import_s']:.2f}x, "
            f"RSS ready {a['ready_mb'] / b['ready_mb']:.2f}x, "
            f"after a request {a['served_mb'] / b['served_mb']:.2f}x"
        )


if __name__ == "__main__":
    main()
