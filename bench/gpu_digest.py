"""A GPU kit's output folder -> what the project records: figures, a cost profile, a default.

After ``bash bench/gpu_kit.sh`` has run on a lent GPU machine and its files are back::

    uv run --frozen --all-extras python -m bench.gpu_digest OUT_DIR > /tmp/gpu.md

prints Markdown for docs/benchmarks.md, one section per file of the kit (a file that is
missing or cut short, a stage that timed out, is said so in its section, and the rest
still comes out):

1. the machine (``env.json``) and each stage's status, time and budget (``summary.json``);
2. the CUDA tests (``cuda_tests.xml``): counts, and each failure's message;
3. the pipeline per backend and batch (``pipeline.jsonl``), against plain diffusers and
   the FLOP floor, and **the fastest backend**: the GPU default to set
   (``RIFFUSION_UNET_BACKEND`` in bentofile.yaml, issue 21);
4. **the measured cost profile**: each accelerated call's line ``fixed + per item``, a
   least-squares fit to its cost at each batch (the ``{"costs": ...}`` rows; the UNet's
   from the fastest backend), written as the ``AcceleratorProfile`` that replaces the
   published one in riffusion/emulation.py, and the ``bench.sim_schedules`` command that
   tells what it allows each schedule;
5. the served open loop (``served.json``): each mode's latency and throughput, and
   continuous's p95 over adaptive's (the target: at most 0.6x at 80 % load);
6. the listener ramp (``listeners.json``): per mode, the fell-behind rate at each user
   count and the most listeners held under 1 %;
7. the engine's own work per step on the GPU host (``overhead.jsonl``), against 5 % of
   the measured UNet step at each batch (two samples per job).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from riffusion.emulation import Cost

# The ``{"costs": ...}`` keys -> the profile's fields; items per call: samples for the
# UNet (two per job), images or clips for the rest.
COST_TERMS = {
    "unet_step_ms": "unet_step",
    "vae_encode_ms": "vae_encode",
    "vae_decode_ms": "vae_decode",
    "griffin_lim_ms": "griffin_lim",
}
HELD_FELL_BEHIND = 0.01  # a listener count is held while under 1 % of handoffs fall behind


def fit_cost(points: Sequence[tuple[float, float]]) -> Cost:
    """(items, seconds) measurements -> the least-squares line ``fixed + per_item x items``.

    One distinct item count gives no slope: the whole cost is then taken as per item.
    A negative intercept (noise, a call cheaper per item in bulk) is clamped to zero and
    the slope refitted through the origin, so the line never prices a call below zero.
    """
    if not points:
        raise ValueError("no measurements to fit")
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread > 0:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        fixed = mean_y - slope * mean_x
        if fixed >= 0:
            return Cost(fixed_s=fixed, per_item_s=slope)
    through_origin = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    return Cost(fixed_s=0.0, per_item_s=through_origin)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of ``path``; lines that are not JSON (a stage's stray output) skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(out: Path) -> str:
    env = json.loads((out / "env.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    head = ", ".join(f"{key} {value}" for key, value in env.items())
    stages = table(
        ["stage", "status", "s", "budget s", "note"],
        [
            [s["name"], s["status"], s["seconds"], s["budget_s"], s["note"]]
            for s in summary["stages"]
        ],
    )
    kind = "DRY RUN on a CPU (toy sizes: no GPU figure)" if summary["dry_run"] else "GPU run"
    return f"{kind}: {head}.\n\n{stages}\n\nKit: {summary['seconds']} s of {summary['budget_s']} s."


def cuda_tests(out: Path) -> str:
    root = ET.parse(out / "cuda_tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "no test suite in cuda_tests.xml"
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    lines = [", ".join(f"{key} {value}" for key, value in counts.items())]
    for case in suite.iter("testcase"):
        for problem in (*case.findall("failure"), *case.findall("error")):
            message = (problem.get("message") or "").splitlines()[:1]
            lines.append(f"- {case.get('name')}: {' '.join(message)}")
    return "\n".join(lines)


def pipeline_rows(
    out: Path,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The per-batch rows, the ``costs`` rows by what they cost (a backend, or
    ``postprocessing``), and the rows that report an error."""
    rows = read_jsonl(out / "pipeline.jsonl")
    batches = [row for row in rows if "backend" in row and "batch" in row]
    costs = {row["costs"]: row for row in rows if "costs" in row}
    return batches, costs, [row for row in rows if "error" in row]


def fastest_backend(batches: Sequence[dict[str, Any]]) -> str | None:
    """The backend with the most clips/s at the largest batch, among those that ran every
    batch (one cut short at its stage's budget is not a candidate: it never showed its
    largest batch, and it printed no cost row)."""
    by_backend: dict[str, dict[int, float]] = {}
    for row in batches:
        by_backend.setdefault(row["backend"], {})[row["batch"]] = row["clips_per_s"]
    every = {batch for speeds in by_backend.values() for batch in speeds}
    complete = [backend for backend, speeds in by_backend.items() if set(speeds) == every]
    if not complete:
        return None
    return max(complete, key=lambda backend: by_backend[backend][max(every)])


def pipeline(out: Path) -> str:
    batches, _, errors = pipeline_rows(out)
    keys = ["backend", "batch", "batch_latency_s", "clips_per_s"]
    keys += ["speedup_vs_diffusers_baseline", "x_flop_floor", "unet_step_ms_batch2"]
    lines = [table(keys, [[_round(row.get(key)) for key in keys] for row in batches])]
    lines += [f"- {row.get('backend', row.get('costs'))}: {row['error']}" for row in errors]
    best = fastest_backend(batches)
    lines.append(
        f"\nFastest backend: **{best}**: set `RIFFUSION_UNET_BACKEND` to it in bentofile.yaml."
        if best
        else "\nNo backend ran a batch: no fastest backend."
    )
    return "\n".join(lines)


def measured_costs(out: Path) -> dict[str, Cost]:
    """Each accelerated call's fitted line (seconds), the UNet's from the fastest backend."""
    batches, costs, _ = pipeline_rows(out)
    best = fastest_backend(batches)
    sources = {"unet_step_ms": costs.get(best or "", {})}
    sources |= dict.fromkeys(COST_TERMS.keys() - {"unet_step_ms"}, costs.get("postprocessing", {}))
    fitted = {}
    for key, field in COST_TERMS.items():
        measured = sources[key].get(key)
        if measured:
            fitted[field] = fit_cost([(int(n), ms / 1000) for n, ms in measured.items()])
    return fitted


def profile(out: Path) -> str:
    fitted = measured_costs(out)
    if not fitted:
        return "no cost rows in pipeline.jsonl"
    rows = [
        [field, f"{cost.fixed_s * 1e3:.3f}", f"{cost.per_item_s * 1e3:.3f}"]
        for field, cost in fitted.items()
    ]
    try:
        device = json.loads((out / "env.json").read_text()).get("device", "no GPU")
    except (OSError, ValueError):
        device = "unknown"
    name = "a10g" if "A10" in device else "h100"
    lines = [table(["call", "fixed ms", "per item ms"], rows), "", "```python"]
    lines.append(f"AcceleratorProfile(  # measured on {device} by the GPU kit")
    lines.append(f'    name="{name}",')
    for field, cost in fitted.items():
        lines.append(f"    {field}=Cost({cost.fixed_s:.5f}, {cost.per_item_s:.5f}),")
    lines += [")", "```"]
    unet = fitted.get("unet_step")
    if unet:
        lines.append(
            f"\n    uv run --frozen --all-extras python -m bench.sim_schedules --profile {name} "
            f"--unet {unet.fixed_s * 1e3:.2f},{unet.per_item_s * 1e3:.2f}"
        )
    return "\n".join(lines)


def served(out: Path) -> str:
    report = json.loads((out / "served.json").read_text())
    keys = ["mode", "load", "requests", "ok", "throughput_rps", "p50_s", "p95_s", "p99_s"]
    keys.append("realtime_share")
    rows = [[_round(load.get(key)) for key in keys] for load in report["loads"]]
    lines = [
        f"Capacity {_round(report.get('capacity_clips_per_s'))} clips/s, "
        f"{_round(report.get('steps'))} steps.",
        "",
        table(keys, rows),
    ]
    p95 = {(load["mode"], load["load"]): load.get("p95_s") for load in report["loads"]}
    for (mode, load), value in p95.items():
        adaptive = p95.get(("adaptive", load))
        if mode == "continuous" and value and adaptive:
            ratio = value / adaptive
            lines.append(f"\nAt {load:.0%}: continuous p95 / adaptive p95 = {ratio:.2f}x")
    return "\n".join(lines)


def listeners(out: Path) -> str:
    report = json.loads((out / "listeners.json").read_text())
    lines = []
    for mode, summary in report.items():
        if summary is None:
            lines.append(f"- {mode}: no report (the stage failed or timed out)")
            continue
        steps = [s for s in summary.get("steps", []) if s.get("fell_behind_rate") is not None]
        held = 0
        for step in steps:
            if step["fell_behind_rate"] >= HELD_FELL_BEHIND:
                break
            held = step["users"]
        ramp = ", ".join(f"{s['users']}: {s['fell_behind_rate']:.0%}" for s in steps)
        lines.append(f"- {mode}: **{held} listeners held** (fell behind by users: {ramp})")
    return "\n".join(lines)


def overhead(out: Path) -> str:
    rows = [r for r in read_jsonl(out / "overhead.jsonl") if "own_ms" in r]
    unet = measured_costs(out).get("unet_step")
    header = ["jobs", "latents", "path", "own ms", "step ms (measured UNet)", "% of it"]
    body = []
    for row in rows:
        if unet:
            step_ms = unet.seconds(2 * row["jobs"]) * 1e3
            body.append([*_head(row), f"{step_ms:.2f}", f"{100 * row['own_ms'] / step_ms:.2f}"])
        else:
            body.append([*_head(row), "-", "-"])
    return table(header, body) + "\n\nTarget: under 5 % at 1, 4, 8 and 16 jobs."


def _head(row: dict[str, Any]) -> list[Any]:
    return [row["jobs"], row["latents"], row["path"], row["own_ms"]]


def _round(value: Any) -> Any:
    if value is None:
        return "-"
    return round(value, 3) if isinstance(value, float) else value


SECTIONS = {
    "Machine and stages": machine,
    "CUDA tests": cuda_tests,
    "Pipeline": pipeline,
    "Measured cost profile": profile,
    "Served open loop": served,
    "Listener ramp": listeners,
    "Engine overhead on the GPU host": overhead,
}


def digest(out: Path) -> str:
    """The whole report; a section whose files are missing or unreadable says why."""
    parts = [f"# GPU kit digest: {out}"]
    for title, section in SECTIONS.items():
        try:
            body = section(out)
        except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as error:
            body = f"not available: {type(error).__name__}: {error}"
        parts.append(f"## {title}\n\n{body}")
    return "\n\n".join(parts) + "\n"


@click.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(out: Path) -> None:
    """Print the Markdown digest of the GPU kit's output folder OUT."""
    sys.stdout.write(digest(out))


if __name__ == "__main__":
    main()
