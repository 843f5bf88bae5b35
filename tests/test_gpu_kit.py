"""The GPU kit (bench/gpu_kit.py): its dry run on the CPU with the tiny model, so it cannot rot.

The dry run is the same script with the same stages at toy sizes; on a GPU machine
the stages run the CUDA tests, the full-size benchmarks and the served runs. Its
budgets hold on a loaded 2-core machine (each stage is killed at its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.gpu_digest import digest, measured_costs
from bench.gpu_kit import Kit, Stage

ROOT = Path(__file__).resolve().parent.parent


def test_a_stage_past_its_budget_is_killed_with_its_children_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    kit = Kit(out=tmp_path, dry_run=True, env={"PATH": "/usr/bin:/bin"})
    marker = tmp_path / "child.pid"
    # The stage's child outlives a kill of the stage's own process unless the group goes.
    slow = Stage("slow", ["sh", "-c", f"sleep 300 & echo $! > {marker}; wait"], budget_s=5)
    began = time.monotonic()
    kit.run(slow, began)
    kit.run(Stage("next", ["sh", "-c", "echo done"], budget_s=30, output="next.txt"), began)
    assert slow.status == "timeout"
    assert slow.seconds < 60
    child = int(marker.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    assert kit.stages[1].status == "ok"
    assert (tmp_path / "next.txt").read_text() == "done\n"
    assert "== slow: timeout" in (tmp_path / "kit.log").read_text()


@pytest.mark.timeout(1200)
def test_the_dry_run_runs_every_stage_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    command = [sys.executable, "bench/gpu_kit.py", "--dry-run", "--no-install", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, timeout=1150)
    log = (out / "kit.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    statuses = {stage["name"]: stage["status"] for stage in summary["stages"]}
    assert statuses == {
        "install": "skipped",
        "env": "ok",
        "cuda_tests": "ok",
        "pipeline": "ok",
        "model": "skipped",
        "serve": "ok",
        "served": "ok",
        "listeners_continuous": "ok",
        "overhead": "ok",
    }, log[-3000:]
    assert result.returncode == 0
    # At most 8 files come back from the lent machine.
    files = {path.name for path in out.iterdir()}
    assert files == {
        "kit.log",
        "summary.json",
        "env.json",
        "cuda_tests.xml",
        "pipeline.jsonl",
        "served.json",
        "listeners.json",
        "overhead.jsonl",
    }

    env = json.loads((out / "env.json").read_text())
    assert env["cuda_available"] is False  # the dry run hides any GPU
    assert not env["locust"].startswith("missing")  # its version read without importing it
    suite = ET.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    assert suite is not None
    assert int(suite.get("tests", 0)) >= 6 and suite.get("skipped") == suite.get("tests")

    rows = [json.loads(line) for line in (out / "pipeline.jsonl").read_text().splitlines()]
    assert rows[0]["model"] == "tiny"
    assert any("baseline" in row for row in rows)
    eager = [row for row in rows if row.get("backend") == "eager"]
    assert [row["batch"] for row in eager] == [1, 2] and eager[0]["clips_per_s"] > 0
    # Each accelerated call's cost at each batch: what bench.gpu_digest fits a profile to.
    costs = {row["costs"]: row for row in rows if "costs" in row}
    assert set(costs["eager"]["unet_step_ms"]) == {"2", "4"}  # samples: two per job
    for key in ("vae_encode_ms", "vae_decode_ms", "griffin_lim_ms"):
        assert set(costs["postprocessing"][key]) == {"1", "2"}
        assert all(ms > 0 for ms in costs["postprocessing"][key].values())

    served = json.loads((out / "served.json").read_text())
    assert served["capacity_clips_per_s"] > 0
    [load] = served["loads"]
    assert load["mode"] == "continuous" and load["ok"] == load["requests"] > 0

    listeners = json.loads((out / "listeners.json").read_text())
    assert listeners["continuous"] is not None

    overhead = [json.loads(line) for line in (out / "overhead.jsonl").read_text().splitlines()]
    [steps] = [row for row in overhead if "own_ms" in row]
    assert steps["jobs"] == 1 and 0 < steps["own_ms"] < steps["step_ms"]

    # The digest reads every file of the run (tests/test_gpu_digest.py: what it makes of them).
    text = digest(out)
    assert text.count("\n## ") == 7 and "not available" not in text
    assert "DRY RUN on a CPU" in text and "Fastest backend: **eager**" in text
    assert set(measured_costs(out)) == {"unet_step", "vae_encode", "vae_decode", "griffin_lim"}
