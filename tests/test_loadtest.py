"""Load tests: traffic model and report units, then a short end-to-end run on the tiny model.

The end-to-end part starts one local server (tiny model) for the module and runs
the headless runner against it a few times for seconds each; it never leaves a
process behind (the runner and the fixture stop their process groups).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from PIL import Image

from load_tests.report import (
    main as report_main,
)
from load_tests.report import plot_history, render_markdown
from load_tests.report_parse import (
    HistoryPoint,
    Thresholds,
    histogram_deltas,
    load_steps,
    read_history,
    summarize,
    threshold_violations,
)
from load_tests.run import parse_env_assignments, parse_run_time
from load_tests.server import LocalServer
from load_tests.traffic import (
    AlphaWalk,
    ResponseCheckError,
    check_audio_file,
    check_clip_payload,
    check_interpolation_payload,
    ramp_users,
    shape_users,
    soak_users,
    spike_users,
    synth_wav,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------- traffic model


def test_alpha_walk_follows_the_web_app() -> None:
    walk = AlphaWalk(random.Random(3), num_inference_steps=50, seed_image_id="og_beat")
    bodies = [walk.next_body() for _ in range(10)]
    assert [b["alpha"] for b in bodies] == [0, 0.25, 0.5, 0.75, 1.0, 0.25, 0.5, 0.75, 1.0, 0.25]
    assert all(b["num_inference_steps"] == 50 and b["seed_image_id"] == "og_beat" for b in bodies)
    # After alpha 1 the old end becomes the start and a new prompt/seed is the end.
    assert bodies[5]["start"] == bodies[4]["end"]
    assert bodies[5]["end"] != bodies[4]["end"]
    assert bodies[5]["end"]["prompt"] != bodies[5]["start"]["prompt"]
    # Within one transition the two ends stay fixed.
    assert all(
        b["start"] == bodies[0]["start"] and b["end"] == bodies[0]["end"] for b in bodies[:5]
    )
    assert bodies[0]["start"]["denoising"] == 0.75 and bodies[0]["start"]["guidance"] == 7.0


def _data_url(media_type: str, payload: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (10, 20, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _mp3(duration_s: float, sample_rate: int = 44100) -> bytes:
    t = np.arange(int(duration_s * sample_rate)) / sample_rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 440 * t), sample_rate, format="MP3")
    return buffer.getvalue()


def _clip(duration_s: float = 2.0, declared_s: float | None = None) -> dict[str, object]:
    return {
        "image": _data_url("image/jpeg", _jpeg()),
        "audio": _data_url("audio/mpeg", _mp3(duration_s)),
        "duration_s": declared_s if declared_s is not None else duration_s,
    }


def test_check_clip_payload_accepts_a_web_app_answer() -> None:
    clip = check_clip_payload(_clip(2.0), expected_duration_s=2.0)
    assert clip.image_format == "JPEG" and clip.image_size == (64, 32)
    assert clip.audio_duration_s == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"duration_s": 4.0}, "duration_s mismatch"),
        ({"duration_s": -1}, "not a positive number"),
        ({"image": "data:image/jpeg;base64,!!notbase64"}, "invalid base64"),
        ({"image": _data_url("image/jpeg", b"not a jpeg")}, "image does not decode"),
        ({"audio": _data_url("audio/mpeg", b"\x00" * 100)}, "audio does not decode"),
        ({"audio": _data_url("text/plain", b"hi")}, "expected audio/"),
        ({"image": 12}, "expected a data URL"),
    ],
)
def test_check_clip_payload_names_what_is_wrong(change: dict[str, object], reason: str) -> None:
    with pytest.raises(ResponseCheckError, match=reason):
        check_clip_payload({**_clip(2.0), **change})


def test_check_clip_payload_needs_every_field() -> None:
    with pytest.raises(ResponseCheckError, match="lacks audio"):
        check_clip_payload({"image": "x", "duration_s": 1.0})


def test_check_audio_file_compares_requested_and_declared_duration() -> None:
    wav = synth_wav(2.5)
    assert check_audio_file(wav, "audio/wav", expected_duration_s=2.5) == pytest.approx(2.5)
    with pytest.raises(ResponseCheckError, match="requested duration mismatch"):
        check_audio_file(wav, "audio/wav", expected_duration_s=5.12)
    with pytest.raises(ResponseCheckError, match="declared duration mismatch"):
        check_audio_file(wav, "audio/wav", declared_duration_s="4.0")
    with pytest.raises(ResponseCheckError, match="expected audio"):
        check_audio_file(wav, "application/json")


def test_check_interpolation_payload_checks_every_clip() -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    payload = {
        "audio": _data_url("audio/mpeg", _mp3(3.0)),
        "format": "mp3",
        "duration_s": 3.0,
        "clips": [{"alpha": a, "image": _data_url("image/png", png.getvalue())} for a in (0, 1)],
    }
    assert check_interpolation_payload(payload, num_clips=2) == pytest.approx(3.0, abs=0.1)
    with pytest.raises(ResponseCheckError, match="expected 3 clip images, got 2"):
        check_interpolation_payload(payload, num_clips=3)


def test_load_shapes_follow_their_schedules() -> None:
    ramp = [ramp_users(t, 100, 10) or 0 for t in range(0, 100, 10)]
    assert ramp == sorted(ramp) and ramp[0] == 2 and ramp[-1] == 10
    assert ramp_users(100, 100, 10) is None
    assert [spike_users(t, 100, 12) for t in (0, 39, 40, 59, 60, 99)] == [3, 3, 12, 12, 3, 3]
    assert soak_users(5, 100, 10) == 5 and soak_users(10, 100, 10) == 10
    assert soak_users(99, 100, 10) == 10 and soak_users(100, 100, 10) is None
    with pytest.raises(ValueError, match="unknown load shape 'wave'"):
        shape_users("wave", 1, 10, 5)


def test_runner_options_are_validated() -> None:
    assert parse_run_time("90") == 90 and parse_run_time("1h2m3s") == 3723
    for bad in ("", "soon", "0s", "99h"):
        with pytest.raises(ValueError):
            parse_run_time(bad)
    assert parse_env_assignments(["RIFFUSION_MAX_BATCH_SIZE=1"]) == {
        "RIFFUSION_MAX_BATCH_SIZE": "1"
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_env_assignments(["no-equals"])


# ------------------------------------------------------------------------ report

PERCENTILES = ["50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]
STATS_COLUMNS = [
    *("Type", "Name", "Request Count", "Failure Count", "Median Response Time"),
    *("Average Response Time", "Min Response Time", "Max Response Time"),
    *("Average Content Size", "Requests/s", "Failures/s"),
    *PERCENTILES,
]
HISTORY_COLUMNS = [
    *("Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s"),
    *PERCENTILES,
    *("Total Request Count", "Total Failure Count"),
]


def _write_csv(path: Path, columns: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def _percentiles(p50: int, p95: int, p99: int) -> list[object]:
    return [p50, p50, p50, p50, p95, p95, p99, p99, p99, p99, p99]


def _metrics(counts: dict[str, int], total: float) -> str:
    lines = ["# TYPE riffusion_batch_size histogram"]
    cumulative = 0
    for upper in ("1.0", "2.0", "4.0", "+Inf"):
        cumulative += counts.get(upper, 0)
        lines.append(f'riffusion_batch_size_bucket{{le="{upper}"}} {cumulative}')
    lines += [f"riffusion_batch_size_count {cumulative}", f"riffusion_batch_size_sum {total}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    prefix = tmp_path / "locust"
    _write_csv(
        Path(f"{prefix}_stats.csv"),
        STATS_COLUMNS,
        [
            ["POST", "/run_inference/", 40, 3, 900, 1000, 300, 4000, 9000, 2.0, 0.1,
             *_percentiles(900, 2500, 3900)],
            ["POST", "/text_to_audio", 10, 0, 700, 800, 200, 1500, 5000, 0.5, 0.0,
             *_percentiles(700, 1400, 1500)],
            ["PLAYBACK", "fell_behind", 20, 5, 0, 300, 0, 2000, 0, 1.0, 0.25,
             *_percentiles(0, 1800, 2000)],
            ["", "Aggregated", 70, 8, 800, 700, 0, 4000, 7000, 3.5, 0.35,
             *_percentiles(800, 2400, 3900)],
        ],
    )  # fmt: skip
    _write_csv(
        Path(f"{prefix}_failures.csv"),
        ["Method", "Name", "Error", "Occurrences", "First Seen", "Last Seen"],
        [
            # As locust writes them: the reason wrapped in the exception's repr.
            [
                "POST",
                "/run_inference/",
                "CatchResponseError('HTTP 429: Too many requests')",
                2,
                "",
                "",
            ],
            ["POST", "/run_inference/", "HTTP 503: model service is at capacity", 1, "", ""],
            ["PLAYBACK", "fell_behind", "clip not ready when the previous one finished", 5, "", ""],
        ],
    )
    history = []
    for second in range(0, 20, 2):
        t = 1_700_000_000 + second
        history += [
            [t, 2, "POST", "/run_inference/", 2.0, 0.1, *_percentiles(900, 2500, 3900), second, 0],
            [t, 2, "PLAYBACK", "fell_behind", 1.0, 0.2, *_percentiles(0, 1800, 2000), second, 1],
            [t, 2, "", "Aggregated", 3.0, 0.3, *_percentiles(800, 2400, 3900), 2 * second, 1],
        ]
    history.insert(0, [1_699_999_999, 0, "", "Aggregated", 0, 0, *["N/A"] * 11, 0, 0])
    _write_csv(Path(f"{prefix}_stats_history.csv"), HISTORY_COLUMNS, history)
    return prefix


def test_summary_separates_requests_from_playback(synthetic_run: Path) -> None:
    before = _metrics({"1.0": 5}, 5.0)
    after = _metrics({"1.0": 7, "2.0": 2, "4.0": 3}, 7 + 4 + 12.0)
    summary = summarize(synthetic_run, before, after, {"target": "test"})
    assert [e.name for e in summary.endpoints] == ["/run_inference/", "/text_to_audio"]
    assert summary.total_requests == 50 and summary.total_failures == 3
    assert summary.failure_rate == pytest.approx(0.06)
    assert summary.rps == pytest.approx(2.5)
    assert summary.fell_behind_rate == pytest.approx(0.25)
    assert summary.status_counts == {"429": 2, "503": 1}
    batch = summary.batch_sizes
    assert batch is not None
    # 2 more batches of 1, 2 of size 2 and 3 of size 3-4 since the first scrape.
    assert batch.count == 7 and batch.mean == pytest.approx(18.0 / 7)
    assert dict(batch.buckets)[1.0] == 2 and dict(batch.buckets)[4.0] == 3
    assert batch.max_upper_bound == 4.0

    markdown = render_markdown(summary, threshold_violations(summary, Thresholds(2000)))
    assert "| POST /run_inference/ | 40 | 3 | 7.5% | 2.00 | 900 | 2500 | 3900 | 4000 |" in markdown
    assert "fell-behind rate 25.0%" in markdown
    assert "By status: 429: 2, 503: 1" in markdown
    assert "mean batch size 2.57" in markdown
    assert "FAIL: p95 of POST /run_inference/ is 2500 ms > --max-p95-ms 2000" in markdown
    assert json.loads(json.dumps(summary.to_dict()))["fell_behind"] == 5


def test_thresholds_gate_each_measure(synthetic_run: Path) -> None:
    summary = summarize(synthetic_run)
    assert threshold_violations(summary, Thresholds(3000, 0.1, 0.3)) == []
    violations = threshold_violations(summary, Thresholds(1000, 0.05, 0.2))
    assert len(violations) == 4  # both endpoints' p95, failure rate, fell-behind rate
    assert any("failure rate is 6.00% (3 of 50)" in v for v in violations)
    assert any("fell-behind rate is 25.00% (5 of 20" in v for v in violations)


def test_chart_is_written_from_history(synthetic_run: Path, tmp_path: Path) -> None:
    history = read_history(Path(f"{synthetic_run}_stats_history.csv"))
    assert history[0].p95_ms is None and history[1].elapsed_s == 1.0
    chart = plot_history(history, tmp_path / "chart.png")
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size[1] > image.size[0] // 2  # three panels


def test_report_command_rebuilds_and_gates_a_folder(synthetic_run: Path) -> None:
    folder = synthetic_run.parent
    (folder / "metrics_before.txt").write_text(_metrics({"1.0": 1}, 1.0))
    (folder / "metrics_after.txt").write_text(_metrics({"1.0": 1, "4.0": 2}, 9.0))
    passed = CliRunner().invoke(report_main, [str(folder), "--max-failure-rate", "0.1"])
    assert passed.exit_code == 0, passed.output
    assert "mean batch size 4.00" in (folder / "summary.md").read_text()
    assert (folder / "chart.png").stat().st_size > 0
    failed = CliRunner().invoke(report_main, [str(folder), "--max-fell-behind-rate", "0.1"])
    assert failed.exit_code == 1
    assert "fell-behind rate is 25.00%" in failed.output
    assert json.loads((folder / "summary.json").read_text())["violations"]
    missing = CliRunner().invoke(report_main, [str(folder), "--csv-prefix", "nothing"])
    assert missing.exit_code == 1 and "nothing_stats.csv is missing" in missing.output


def test_load_steps_split_a_ramp_with_exact_counts() -> None:
    def point(
        t: float, users: int, kind: str, name: str, total: int, fails: int, p95: float | None
    ):
        return HistoryPoint(t, users, kind, name, 0.0, 0.0, None, p95, None, total, fails)

    history = [point(0, 0, "", "Aggregated", 0, 0, None)]
    for t, users, requests, failures, p95 in [
        (2, 2, 4, 0, 800.0), (4, 2, 10, 0, 900.0), (6, 4, 14, 1, 2000.0), (8, 4, 20, 3, 3000.0)
    ]:  # fmt: skip
        history += [
            point(t, users, "", "Aggregated", requests + 1, failures, p95),
            point(t, users, "POST", "/run_inference/", requests, failures, p95),
            point(t, users, "PLAYBACK", "fell_behind", t, t // 4, 10.0),
        ]
    first, second = load_steps(history)
    assert (first.users, first.start_s, first.end_s) == (2, 0, 4)
    assert (first.requests, first.failures, first.rps, first.p95_ms) == (10, 0, 2.5, 850.0)
    assert (second.users, second.requests, second.failures) == (4, 10, 3)
    assert second.rps == pytest.approx(2.5) and second.p95_ms == 2500.0
    assert (second.handoffs, second.fell_behind) == (4, 1)


def test_histogram_deltas_ignore_other_metrics() -> None:
    text = '# TYPE other_seconds histogram\nother_seconds_bucket{le="+Inf"} 3\n'
    text += "other_seconds_count 3\nother_seconds_sum 1.0\n"
    assert histogram_deltas(text, text) == {}


# ------------------------------------------------------------ end to end (tiny)


@pytest.fixture(scope="module")
def server(open_server: LocalServer) -> str:
    return open_server.url


def _runner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "load_tests.run", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_smoke_run_writes_a_full_report_and_gates(server: str, tmp_path: Path) -> None:
    """One listener for 90 s (Griffin-Lim on CPU costs seconds per clip) with an
    impossible p95 limit: the runner must write everything and exit 1; the same
    folder re-gated with generous limits (same code path as the runner) passes."""
    output = tmp_path / "report"
    result = _runner(
        *("--host", server, "-u", "1", "-t", "90s", "-o", str(output)),
        *("--user-class", "WebAppListener", "--playback-speed", "20"),
        *("--num-inference-steps", "2", "--locust-arg=--request-timeout=300"),
        *("--max-p95-ms", "1", "--max-failure-rate", "0", "--max-fell-behind-rate", "1"),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    stderr = " ".join(result.stderr.split())  # rich wraps long lines
    assert "threshold exceeded: p95 of POST /run_inference/ is" in stderr
    assert "> --max-p95-ms 1" in stderr
    assert stderr.count("threshold exceeded") == 1  # no failures; hand-overs were measured

    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv"):
        assert (output / name).stat().st_size > 0
    assert "<html" in (output / "report.html").read_text().lower()
    with Image.open(output / "chart.png") as chart:
        assert chart.format == "PNG"
    summary = json.loads((output / "summary.json").read_text())
    run_inference = {e["name"]: e for e in summary["endpoints"]}["/run_inference/"]
    assert run_inference["requests"] >= 2 and run_inference["failures"] == 0
    assert run_inference["p95_ms"] > 0
    assert summary["handoffs"] > 0 and 0.0 <= summary["fell_behind_rate"] <= 1.0
    assert summary["histograms"]["riffusion_batch_size"]["count"] > 0
    markdown = (output / "summary.md").read_text()
    assert "fell-behind rate" in markdown and "FAIL: p95 of POST /run_inference/" in markdown

    limits = ["--max-p95-ms", "600000", "--max-failure-rate", "0", "--max-fell-behind-rate", "1"]
    generous = CliRunner().invoke(report_main, [str(output), *limits])
    assert generous.exit_code == 0, generous.output
    assert "All thresholds met." in (output / "summary.md").read_text()
