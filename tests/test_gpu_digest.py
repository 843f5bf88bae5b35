"""bench/gpu_digest.py: a GPU kit's output folder -> the figures, the cost profile, the default.

The kit's own dry run feeds it in tests/test_gpu_kit.py; here, folders written by hand
say what a GPU run would: several backends, one cut short, and files missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.gpu_digest import digest, fastest_backend, fit_cost, main, measured_costs


def test_fit_cost_recovers_a_line_and_never_prices_a_call_below_zero() -> None:
    line = fit_cost([(n, 0.0034 + 0.00403 * n) for n in (2, 4, 8, 16)])
    assert line.fixed_s == pytest.approx(0.0034)
    assert line.per_item_s == pytest.approx(0.00403)
    # One item count: no slope to fit, the whole cost per item.
    alone = fit_cost([(2, 0.010)])
    assert (alone.fixed_s, alone.per_item_s) == (0.0, pytest.approx(0.005))
    # Cheaper per item in bulk than a line through zero allows: refitted through zero.
    bulk = fit_cost([(1, 0.010), (8, 0.100)])
    assert bulk.fixed_s == 0.0
    assert bulk.per_item_s == pytest.approx((0.010 + 8 * 0.100) / 65)
    with pytest.raises(ValueError, match="no measurements"):
        fit_cost([])


def _rows(*rows: dict[str, object]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _gpu_run(out: Path) -> None:
    """A kit's folder as a GPU run would leave it, the compiled backend cut short at its
    budget after batch 4 (its batch 8 row and cost row never printed)."""
    out.mkdir()
    (out / "env.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "torch": "2.11"}))
    stages = [
        {"name": "pipeline", "status": "timeout", "seconds": 120, "budget_s": 120, "note": "x"},
        {"name": "served", "status": "ok", "seconds": 58, "budget_s": 60, "note": ""},
    ]
    summary = {"dry_run": False, "seconds": 530, "budget_s": 540, "stages": stages}
    (out / "summary.json").write_text(json.dumps(summary))
    batch = [
        {"backend": backend, "batch": b, "batch_latency_s": b / cps, "clips_per_s": cps}
        for backend, speeds in (
            ("eager", {1: 2.0, 4: 2.6, 8: 2.8}),
            ("traced", {1: 2.2, 4: 2.9, 8: 3.1}),
            ("compiled", {1: 2.5, 4: 3.4}),
        )
        for b, cps in speeds.items()
    ]
    (out / "pipeline.jsonl").write_text(
        "a warning a stage printed\n"
        + _rows(
            *batch,
            {"costs": "eager", "unet_step_ms": {"2": 12.0, "8": 36.0, "16": 68.0}},
            {"costs": "traced", "unet_step_ms": {"2": 11.0, "8": 32.0, "16": 60.0}},
            {
                "costs": "postprocessing",
                "vae_encode_ms": {"1": 10.0, "8": 73.0},
                "vae_decode_ms": {"1": 20.0, "8": 146.0},
                "griffin_lim_ms": {"1": 7.0, "8": 49.0},
            },
        )
    )
    loads = [
        {"mode": mode, "load": 0.8, "requests": 30, "ok": 30, "p50_s": 1.0, "p95_s": p95}
        for mode, p95 in (("continuous", 1.5), ("adaptive", 3.0))
    ]
    (out / "served.json").write_text(json.dumps({"capacity_clips_per_s": 2.9, "loads": loads}))
    rates = {5: 0.0, 10: 0.0, 15: 0.02, 20: 0.0}  # held: 10 (the first miss ends it)
    ramp = {"steps": [{"users": u, "fell_behind_rate": r} for u, r in rates.items()]}
    (out / "listeners.json").write_text(json.dumps({"continuous": ramp, "adaptive": None}))
    (out / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="6" failures="1" errors="0" skipped="0">'
        '<testcase name="test_traced_unet_matches_eager"/>'
        '<testcase name="test_peak_memory_fits_an_a10g">'
        '<failure message="assert 25.1 &lt;= 24.0&#10;more lines">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    (out / "overhead.jsonl").write_text(
        _rows({"jobs": 1, "latents": "64x64", "path": "batched", "own_ms": 0.5})
    )


def test_a_gpu_runs_folder_gives_the_fastest_backend_its_profile_and_each_figure(
    tmp_path: Path,
) -> None:
    out = tmp_path / "kit"
    _gpu_run(out)
    # The compiled backend was fastest while it ran, but it never reached batch 8.
    rows = [json.loads(line) for line in (out / "pipeline.jsonl").read_text().splitlines()[1:]]
    assert fastest_backend([row for row in rows if "batch" in row]) == "traced"
    costs = measured_costs(out)
    # The UNet's line comes from the fastest backend's calls (traced: 11, 32, 60 ms).
    assert costs["unet_step"] == fit_cost([(2, 0.011), (8, 0.032), (16, 0.060)])
    assert costs["vae_decode"].fixed_s == pytest.approx(0.002)
    assert costs["vae_decode"].per_item_s == pytest.approx(0.018)

    text = digest(out)
    assert "not available" not in text
    assert "Fastest backend: **traced**" in text
    assert "# measured on NVIDIA H100 80GB HBM3" in text
    unet = costs["unet_step"]
    command = f"--profile h100 --unet {unet.fixed_s * 1e3:.2f},{unet.per_item_s * 1e3:.2f}"
    assert command in text
    assert "continuous p95 / adaptive p95 = 0.50x" in text
    assert "continuous: **10 listeners held**" in text
    assert "adaptive: no report" in text
    # The host's work per step against the measured step at one job (two samples).
    share = 100 * 0.5 / (unet.seconds(2) * 1e3)
    assert f"| 1 | 64x64 | batched | 0.5 | {unet.seconds(2) * 1e3:.2f} | {share:.2f} |" in text
    assert "| pipeline | timeout | 120 | 120 | x |" in text
    assert "tests 6, failures 1, errors 0, skipped 0" in text
    assert "- test_peak_memory_fits_an_a10g: assert 25.1 <= 24.0\n" in text


def test_missing_or_broken_files_are_named_and_the_rest_still_comes_out(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    _gpu_run(out)
    (out / "served.json").unlink()
    (out / "cuda_tests.xml").write_text("<testsuites><testsuite")  # cut short
    result = CliRunner().invoke(main, [str(out)])
    assert result.exit_code == 0, result.output
    sections = result.output.split("\n## ")
    served = next(s for s in sections if s.startswith("Served open loop"))
    assert "not available: FileNotFoundError" in served
    cuda = next(s for s in sections if s.startswith("CUDA tests"))
    assert "not available: ParseError" in cuda
    assert "Fastest backend: **traced**" in result.output
    assert "10 listeners held" in result.output
