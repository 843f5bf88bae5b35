"""Read locust's CSV output and ``/metrics`` scrapes; write the summary, chart and verdict.

``python -m load_tests.report FOLDER [--max-p95-ms ...]`` (re)builds ``summary.md``,
``summary.json`` and ``chart.png`` for a folder of locust output (e.g. from a plain
distributed ``locust --csv FOLDER/locust --csv-full-history`` run) and gates on it.

Locust writes ``<prefix>_stats.csv`` (totals per endpoint), ``<prefix>_stats_history.csv``
(one row per endpoint every few seconds) and ``<prefix>_failures.csv`` (reasons). Rows
of type ``PLAYBACK`` are the web-app listeners' clip hand-overs, not HTTP requests:
they are summarised as the fell-behind rate and kept out of the request figures.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from prometheus_client.parser import text_string_to_metric_families

CSV_PREFIX = "locust"
METRICS_BEFORE, METRICS_AFTER = "metrics_before.txt", "metrics_after.txt"
PLAYBACK_REQUEST_TYPE = "PLAYBACK"
AGGREGATED_NAME = "Aggregated"
BATCH_SIZE_METRIC = "riffusion_batch_size"
REQUEST_COLUMNS = (
    *("endpoint", "requests", "failures", "failure rate", "RPS"),
    *("p50 ms", "p95 ms", "p99 ms", "max ms"),
)
_STATUS_RE = re.compile(r"HTTP (\d{3})")
F = TypeVar("F", bound=Callable[..., Any])


class ReportError(ValueError):
    """Locust output that is missing or not in the expected format."""


@dataclass(frozen=True)
class EndpointStats:
    """Totals for one endpoint (or the playback hand-overs) over the whole run."""

    request_type: str
    name: str
    requests: int
    failures: int
    rps: float
    median_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def label(self) -> str:
        return f"{self.request_type} {self.name}".strip()


@dataclass(frozen=True)
class FailureReason:
    request_type: str
    name: str
    error: str
    occurrences: int


@dataclass(frozen=True)
class HistogramDelta:
    """What a Prometheus histogram gained between two scrapes (summed over label sets)."""

    name: str
    count: float
    total: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, observations in this bucket)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def max_upper_bound(self) -> float | None:
        """Upper bound of the highest non-empty bucket (the largest value seen, rounded up)."""
        seen = [upper for upper, count in self.buckets if count > 0]
        return max(seen) if seen else None


@dataclass
class LoadTestSummary:
    endpoints: list[EndpointStats]
    playback: EndpointStats | None
    failures: list[FailureReason]
    histograms: dict[str, HistogramDelta] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    steps: list[LoadStep] = field(default_factory=list)

    @property
    def total_requests(self) -> int:
        return sum(e.requests for e in self.endpoints)

    @property
    def total_failures(self) -> int:
        return sum(e.failures for e in self.endpoints)

    @property
    def failure_rate(self) -> float:
        return self.total_failures / self.total_requests if self.total_requests else 0.0

    @property
    def rps(self) -> float:
        return sum(e.rps for e in self.endpoints)

    @property
    def handoffs(self) -> int:
        return self.playback.requests if self.playback else 0

    @property
    def fell_behind(self) -> int:
        return self.playback.failures if self.playback else 0

    @property
    def fell_behind_rate(self) -> float | None:
        return self.fell_behind / self.handoffs if self.handoffs else None

    @property
    def status_counts(self) -> dict[str, int]:
        """Failures by HTTP status (e.g. 429, 503) from the failure reasons."""
        counts: Counter[str] = Counter()
        for failure in self.failures:
            if failure.request_type == PLAYBACK_REQUEST_TYPE:
                continue
            match = _STATUS_RE.search(failure.error)
            counts[match.group(1) if match else "other"] += failure.occurrences
        return dict(sorted(counts.items()))

    @property
    def batch_sizes(self) -> HistogramDelta | None:
        return self.histograms.get(BATCH_SIZE_METRIC)

    def to_dict(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "total_requests": self.total_requests,
            "total_failures": self.total_failures,
            "failure_rate": self.failure_rate,
            "rps": self.rps,
            "handoffs": self.handoffs,
            "fell_behind": self.fell_behind,
            "fell_behind_rate": self.fell_behind_rate,
            "status_counts": self.status_counts,
            "endpoints": [asdict(e) | {"failure_rate": e.failure_rate} for e in self.endpoints],
            "playback": asdict(self.playback) if self.playback else None,
            "failures": [asdict(f) for f in self.failures],
            "steps": [
                asdict(s) | {"rps": s.rps, "fell_behind_rate": s.fell_behind_rate}
                for s in self.steps
            ],
            "histograms": {
                name: asdict(h) | {"mean": h.mean, "max_upper_bound": h.max_upper_bound}
                for name, h in self.histograms.items()
            },
        }


# --- reading locust's CSV files ---


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ReportError(f"locust output {path} is missing (did locust run?)")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value: str | None) -> float | None:
    """A locust CSV number; 'N/A' or empty (no requests yet) becomes None."""
    if value is None or value.strip() in ("", "N/A"):
        return None
    return float(value)


def _required(row: Mapping[str, str], column: str, path: Path) -> str:
    if column not in row:
        raise ReportError(f"{path.name} has no column {column!r}; columns: {', '.join(row)}")
    return row[column]


def read_stats(path: Path) -> list[EndpointStats]:
    """Per-endpoint totals from ``<prefix>_stats.csv`` (the Aggregated row is dropped)."""
    stats = []
    for row in _read_csv(path):
        if _required(row, "Name", path) == AGGREGATED_NAME:
            continue
        stats.append(
            EndpointStats(
                request_type=_required(row, "Type", path),
                name=row["Name"],
                requests=int(_required(row, "Request Count", path)),
                failures=int(_required(row, "Failure Count", path)),
                rps=float(_required(row, "Requests/s", path)),
                median_ms=_number(row.get("50%")),
                p95_ms=_number(row.get("95%")),
                p99_ms=_number(row.get("99%")),
                max_ms=_number(row.get("Max Response Time")),
            )
        )
    return stats


def read_failures(path: Path) -> list[FailureReason]:
    if not path.is_file():
        return []
    return [
        FailureReason(
            request_type=_required(row, "Method", path),
            name=row["Name"],
            error=row["Error"],
            occurrences=int(row["Occurrences"]),
        )
        for row in _read_csv(path)
    ]


@dataclass(frozen=True)
class HistoryPoint:
    elapsed_s: float
    users: int
    request_type: str
    name: str
    rps: float
    failures_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    total_requests: int
    total_failures: int


def read_history(path: Path) -> list[HistoryPoint]:
    """Rows of ``<prefix>_stats_history.csv`` with time relative to the first row."""
    rows = _read_csv(path)
    if not rows:
        return []
    start = float(_required(rows[0], "Timestamp", path))
    return [
        HistoryPoint(
            elapsed_s=float(row["Timestamp"]) - start,
            users=int(_required(row, "User Count", path)),
            request_type=row["Type"],
            name=row["Name"],
            rps=_number(row["Requests/s"]) or 0.0,
            failures_per_s=_number(row["Failures/s"]) or 0.0,
            p50_ms=_number(row.get("50%")),
            p95_ms=_number(row.get("95%")),
            p99_ms=_number(row.get("99%")),
            total_requests=int(row["Total Request Count"]),
            total_failures=int(row["Total Failure Count"]),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class LoadStep:
    """A stretch of the run at one user count (one step of a ramp, the peak of a spike)."""

    users: int
    start_s: float
    end_s: float
    requests: int
    failures: int
    p95_ms: float | None  # median over the step of the slowest endpoint's window p95
    handoffs: int
    fell_behind: int

    @property
    def rps(self) -> float:
        duration = self.end_s - self.start_s
        return self.requests / duration if duration > 0 else 0.0

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def fell_behind_rate(self) -> float | None:
        return self.fell_behind / self.handoffs if self.handoffs else None


def load_steps(history: Sequence[HistoryPoint]) -> list[LoadStep]:
    """Split the history where the user count changes; counts are exact deltas per step."""
    by_time: dict[float, list[HistoryPoint]] = {}
    for point in history:
        by_time.setdefault(point.elapsed_s, []).append(point)
    segments: list[tuple[int, list[float]]] = []
    for elapsed, points in sorted(by_time.items()):
        users = next((p.users for p in points if p.name == AGGREGATED_NAME), points[0].users)
        if segments and segments[-1][0] == users:
            segments[-1][1].append(elapsed)
        else:
            segments.append((users, [elapsed]))

    def totals(elapsed: float | None) -> tuple[int, int, int, int]:
        points = by_time.get(elapsed, []) if elapsed is not None else []
        requests = [p for p in points if p.request_type not in ("", PLAYBACK_REQUEST_TYPE)]
        playback = [p for p in points if p.request_type == PLAYBACK_REQUEST_TYPE]
        return (
            sum(p.total_requests for p in requests),
            sum(p.total_failures for p in requests),
            sum(p.total_requests for p in playback),
            sum(p.total_failures for p in playback),
        )

    steps = []
    previous_end: float | None = None
    for users, times in segments:
        before, after = totals(previous_end), totals(times[-1])
        window_p95 = [
            max(values)
            for t in times
            if (
                values := [
                    p.p95_ms
                    for p in by_time[t]
                    if p.p95_ms is not None and p.request_type not in ("", PLAYBACK_REQUEST_TYPE)
                ]
            )
        ]
        if users > 0:
            steps.append(
                LoadStep(
                    users=users,
                    start_s=previous_end if previous_end is not None else times[0],
                    end_s=times[-1],
                    requests=after[0] - before[0],
                    failures=after[1] - before[1],
                    p95_ms=statistics.median(window_p95) if window_p95 else None,
                    handoffs=after[2] - before[2],
                    fell_behind=after[3] - before[3],
                )
            )
        previous_end = times[-1]
    return steps


# --- /metrics ---


def histogram_buckets(metrics_text: str) -> dict[str, tuple[dict[float, float], float, float]]:
    """Histograms in Prometheus text: name -> (cumulative buckets by upper bound, count, sum)."""
    result: dict[str, tuple[dict[float, float], float, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.type != "histogram":
            continue
        buckets: dict[float, float] = {}
        count = total = 0.0
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                upper = float(sample.labels["le"])
                buckets[upper] = buckets.get(upper, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
        result[family.name] = (buckets, count, total)
    return result


def histogram_deltas(
    before: str, after: str, prefix: str = "riffusion_"
) -> dict[str, HistogramDelta]:
    """Observations each ``prefix*`` histogram gained between two ``/metrics`` scrapes."""
    old = histogram_buckets(before)
    deltas = {}
    for name, (buckets, count, total) in histogram_buckets(after).items():
        if not name.startswith(prefix):
            continue
        old_buckets, old_count, old_total = old.get(name, ({}, 0.0, 0.0))
        cumulative = [
            (upper, buckets[upper] - old_buckets.get(upper, 0.0)) for upper in sorted(buckets)
        ]
        per_bucket = []
        previous = 0.0
        for upper, value in cumulative:
            per_bucket.append((upper, value - previous))
            previous = value
        deltas[name] = HistogramDelta(name, count - old_count, total - old_total, tuple(per_bucket))
    return deltas


# --- building the summary ---


def summarize(
    csv_prefix: Path,
    metrics_before: str | None = None,
    metrics_after: str | None = None,
    context: Mapping[str, str] | None = None,
) -> LoadTestSummary:
    prefix = str(csv_prefix)
    stats = read_stats(Path(prefix + "_stats.csv"))
    playback = [s for s in stats if s.request_type == PLAYBACK_REQUEST_TYPE]
    history_path = Path(prefix + "_stats_history.csv")
    histograms = (
        histogram_deltas(metrics_before, metrics_after)
        if metrics_before is not None and metrics_after is not None
        else {}
    )
    return LoadTestSummary(
        endpoints=[s for s in stats if s.request_type != PLAYBACK_REQUEST_TYPE],
        playback=playback[0] if playback else None,
        failures=read_failures(Path(prefix + "_failures.csv")),
        histograms=histograms,
        context=dict(context or {}),
        steps=load_steps(read_history(history_path)) if history_path.is_file() else [],
    )


@dataclass(frozen=True)
class Thresholds:
    max_p95_ms: float | None = None
    max_failure_rate: float | None = None
    max_fell_behind_rate: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


def threshold_violations(summary: LoadTestSummary, thresholds: Thresholds) -> list[str]:
    """One readable line per threshold the run exceeded (empty: the run passes)."""
    violations = []
    if thresholds.any and summary.total_requests == 0:
        violations.append("no requests completed, so no threshold can be checked")
    if thresholds.max_p95_ms is not None:
        for endpoint in summary.endpoints:
            if endpoint.p95_ms is not None and endpoint.p95_ms > thresholds.max_p95_ms:
                violations.append(
                    f"p95 of {endpoint.label} is {endpoint.p95_ms:.0f} ms "
                    f"> --max-p95-ms {thresholds.max_p95_ms:g}"
                )
    if thresholds.max_failure_rate is not None and (
        summary.failure_rate > thresholds.max_failure_rate
    ):
        violations.append(
            f"failure rate is {summary.failure_rate:.2%} ({summary.total_failures} of "
            f"{summary.total_requests}) > --max-failure-rate {thresholds.max_failure_rate:g}"
        )
    if thresholds.max_fell_behind_rate is not None:
        rate = summary.fell_behind_rate
        if rate is None:
            violations.append(
                "no playback hand-overs were measured (no WebAppListener got past its first "
                "clip), so --max-fell-behind-rate cannot be checked"
            )
        elif rate > thresholds.max_fell_behind_rate:
            violations.append(
                f"fell-behind rate is {rate:.2%} ({summary.fell_behind} of {summary.handoffs} "
                f"hand-overs) > --max-fell-behind-rate {thresholds.max_fell_behind_rate:g}"
            )
    return violations


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
    request_failures = [f for f in summary.failures if f.request_type != PLAYBACK_REQUEST_TYPE]
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
