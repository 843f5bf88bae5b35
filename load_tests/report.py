"""Render a load test's summary (markdown, JSON, chart) and gate on it.

``python -m load_tests.report FOLDER [--max-p95-ms ...]`` (re)builds ``summary.md``,
``summary.json`` and ``chart.png`` for a folder of locust output (e.g. from a plain
distributed ``locust --csv FOLDER/locust --csv-full-history`` run) and gates on it.
Parsing (locust's CSV files, ``/metrics`` scrapes, thresholds) is in
:mod:`load_tests.report_parse`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from load_tests.report_parse import (
    AGGREGATED_NAME,
    CSV_PREFIX,
    METRICS_AFTER,
    METRICS_BEFORE,
    NOT_HTTP,
    PLAYBACK_REQUEST_TYPE,
    REQUEST_COLUMNS,
    HistoryPoint,
    LoadTestSummary,
    ReportError,
    Thresholds,
    read_history,
    summarize,
    threshold_violations,
)

F = TypeVar("F", bound=Callable[..., Any])

# --- rendering ---


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(summary: LoadTestSummary, violations: Sequence[str] | None = None) -> str:
    lines = ["# Load test summary", ""]
    lines += [f"- {key}: {value}" for key, value in summary.context.items()]
    lines += ["", "## Requests", ""]
    rows = [
        [
            e.label,
            str(e.requests),
            str(e.failures),
            f"{e.failure_rate:.1%}",
            f"{e.rps:.2f}",
            _ms(e.median_ms),
            _ms(e.p95_ms),
            _ms(e.p99_ms),
            _ms(e.max_ms),
        ]
        for e in summary.endpoints
    ]
    rows.append(
        [
            "**all requests**",
            str(summary.total_requests),
            str(summary.total_failures),
            f"{summary.failure_rate:.1%}",
            f"{summary.rps:.2f}",
            "",
            "",
            "",
            "",
        ]
    )
    lines += _table(REQUEST_COLUMNS, rows)
    lines += ["", "## Web-app listeners", ""]
    if summary.playback is None or summary.fell_behind_rate is None:
        lines.append("No playback hand-overs measured (no WebAppListener played a second clip).")
    else:
        lines.append(
            f"Fell behind on {summary.fell_behind} of {summary.handoffs} clip hand-overs "
            f"(**fell-behind rate {summary.fell_behind_rate:.1%}**). Wait for the next clip: "
            f"p50 {_ms(summary.playback.median_ms)} ms, p95 {_ms(summary.playback.p95_ms)} ms, "
            f"max {_ms(summary.playback.max_ms)} ms."
        )
    if summary.sessions:
        lines += ["", "## Session listeners", ""]
        longest = summary.longest_underrun_ms
        lines.append(
            f"{summary.sessions_opened} sessions admitted, {summary.sessions_refused} refused "
            f"(the service was full). {summary.session_clips} clips: "
            f"**{summary.underruns} underruns**, {summary.underrun_s:.1f} s of silence in all"
            + (f", the longest {_ms(longest)} ms." if longest is not None else ".")
        )
    if len(summary.steps) > 1:
        lines += ["", "## Load steps (user count over time)", ""]
        lines += _table(
            ["users", "from s", "to s", "requests", "failures", "RPS", "p95 ms", "fell behind"],
            (
                [
                    str(step.users),
                    f"{step.start_s:.0f}",
                    f"{step.end_s:.0f}",
                    str(step.requests),
                    str(step.failures),
                    f"{step.rps:.2f}",
                    _ms(step.p95_ms),
                    "-" if step.fell_behind_rate is None else f"{step.fell_behind_rate:.0%}",
                ]
                for step in summary.steps
            ),
        )
        lines += [
            "",
            "p95 here is the median over the step of the slowest endpoint's 10 s window.",
        ]
    lines += ["", "## Failures", ""]
    request_failures = [f for f in summary.failures if f.request_type not in NOT_HTTP]
    if not request_failures:
        lines.append("None.")
    else:
        statuses = ", ".join(f"{code}: {n}" for code, n in summary.status_counts.items())
        lines += [f"By status: {statuses}", ""]
        lines += _table(
            ["endpoint", "reason", "count"],
            (
                [f"{f.request_type} {f.name}", f.error.replace("|", "/"), str(f.occurrences)]
                for f in request_failures
            ),
        )
    lines += ["", "## Batching and server timings (from /metrics)", ""]
    if not summary.histograms:
        lines.append("No riffusion_* histograms were scraped.")
    else:
        batch = summary.batch_sizes
        if batch is not None and batch.count:
            distribution = ", ".join(
                f"<= {upper:g}: {count:.0f}" for upper, count in batch.buckets if count > 0
            )
            lines += [
                f"Batches run: {batch.count:.0f}, mean batch size {batch.mean:.2f}, "
                f"largest <= {batch.max_upper_bound:g} ({distribution}).",
                "",
            ]
        lines += _table(
            ["histogram", "observations", "mean"],
            (
                [h.name, f"{h.count:.0f}", "-" if h.mean is None else f"{h.mean:.3g}"]
                for h in summary.histograms.values()
            ),
        )
    if violations is not None:
        lines += ["", "## Thresholds", ""]
        lines += [f"- FAIL: {v}" for v in violations] if violations else ["All thresholds met."]
    return "\n".join(lines) + "\n"


def plot_history(history: Sequence[HistoryPoint], output: Path) -> Path:
    """PNG of latency percentiles, throughput and users over time (and fell-behind rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    requests = [p for p in history if p.request_type != PLAYBACK_REQUEST_TYPE]
    endpoints = sorted({p.name for p in requests if p.name != AGGREGATED_NAME})
    playback = [p for p in history if p.request_type == PLAYBACK_REQUEST_TYPE]
    panels = 3 if playback else 2
    figure, axes = plt.subplots(panels, 1, figsize=(10, 3.2 * panels), sharex=True)
    latency, throughput = axes[0], axes[1]
    for name in endpoints:
        points = [p for p in requests if p.name == name]
        times = [p.elapsed_s for p in points]
        for percentile, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            values = [getattr(p, f"{percentile}_ms") for p in points]
            latency.plot(
                times,
                [math.nan if v is None else v for v in values],
                style,
                label=f"{name} {percentile}",
            )
        throughput.plot(times, [p.rps for p in points], label=f"{name} RPS")
    latency.set_ylabel("latency (ms)")
    latency.set_title("Response time percentiles (current window)")
    if endpoints:
        latency.legend(fontsize="small", ncol=3)
    # Locust's Aggregated row also counts playback hand-overs: sum the endpoints instead.
    failures_at: dict[float, float] = {}
    for point in requests:
        if point.name != AGGREGATED_NAME:
            failures_at[point.elapsed_s] = (
                failures_at.get(point.elapsed_s, 0.0) + point.failures_per_s
            )
    if failures_at:
        times = sorted(failures_at)
        throughput.plot(times, [failures_at[t] for t in times], color="red", label="failures/s")
    totals = [p for p in history if p.name == AGGREGATED_NAME]
    if totals:
        users_axis = throughput.twinx()
        users_axis.step(
            [p.elapsed_s for p in totals],
            [p.users for p in totals],
            where="post",
            color="grey",
            alpha=0.6,
            label="users",
        )
        users_axis.set_ylabel("users")
    throughput.set_ylabel("requests/s")
    throughput.set_title("Throughput")
    if endpoints:
        throughput.legend(fontsize="small", loc="upper left")
    if playback:
        rates = [
            p.total_failures / p.total_requests if p.total_requests else math.nan for p in playback
        ]
        axes[2].plot([p.elapsed_s for p in playback], [100 * r for r in rates], color="purple")
        axes[2].set_ylabel("fell behind (%)")
        axes[2].set_ylim(0, 100)
        axes[2].set_title("Listener hand-overs that fell behind (cumulative)")
    axes[-1].set_xlabel("elapsed (s)")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def write_report(
    folder: Path,
    csv_prefix: str = CSV_PREFIX,
    thresholds: Thresholds | None = None,
    context: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``summary.md``, ``summary.json`` and ``chart.png`` into ``folder``.

    Uses ``<csv_prefix>_*.csv`` and, when present, the ``/metrics`` scrapes saved as
    ``metrics_before.txt``/``metrics_after.txt``. Returns the threshold violations.
    """
    thresholds = thresholds or Thresholds()
    scrapes = [folder / METRICS_BEFORE, folder / METRICS_AFTER]
    before, after = (path.read_text() if path.is_file() else None for path in scrapes)
    summary = summarize(folder / csv_prefix, before, after, context)
    violations = threshold_violations(summary, thresholds)
    plot_history(read_history(folder / f"{csv_prefix}_stats_history.csv"), folder / "chart.png")
    (folder / "summary.md").write_text(render_markdown(summary, violations))
    verdict = {"thresholds": asdict(thresholds), "violations": violations}
    (folder / "summary.json").write_text(json.dumps(summary.to_dict() | verdict, indent=2))
    return violations


def threshold_options(command: F) -> F:
    """The --max-* gate options shared by this command and the headless runner."""
    options = [
        click.option(
            "--max-p95-ms",
            type=click.FloatRange(min=0),
            default=None,
            help="Fail if any endpoint's p95 exceeds this.",
        ),
        click.option(
            "--max-failure-rate",
            type=click.FloatRange(0, 1),
            default=None,
            help="Fail if the share of failed requests exceeds this (0-1).",
        ),
        click.option(
            "--max-fell-behind-rate",
            type=click.FloatRange(0, 1),
            default=None,
            help="Fail if the share of listener hand-overs that fell behind exceeds this.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(context_settings={"show_default": True})
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--csv-prefix", default=CSV_PREFIX, help="The --csv prefix locust was given.")
@threshold_options
def main(
    folder: Path,
    csv_prefix: str,
    max_p95_ms: float | None,
    max_failure_rate: float | None,
    max_fell_behind_rate: float | None,
) -> None:
    """Summarise a folder of locust CSV output; exit 1 if a threshold is exceeded."""
    try:
        violations = write_report(
            folder, csv_prefix, Thresholds(max_p95_ms, max_failure_rate, max_fell_behind_rate)
        )
    except ReportError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {folder}/summary.md, summary.json, chart.png")
    for violation in violations:
        click.echo(f"threshold exceeded: {violation}", err=True)
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
