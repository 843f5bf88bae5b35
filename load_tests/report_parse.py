"""Parse a load test's output: locust's CSV files and the ``/metrics`` scrapes, into a
``LoadTestSummary``, and judge it against ``Thresholds``. Rendering is in
:mod:`load_tests.report`.

Locust writes ``<prefix>_stats.csv`` (totals per endpoint), ``<prefix>_stats_history.csv``
(one row per endpoint every few seconds) and ``<prefix>_failures.csv`` (reasons). Rows
of type ``PLAYBACK`` are the web-app listeners' clip hand-overs, not HTTP requests:
they are summarised as the fell-behind rate and kept out of the request figures.
"""

from __future__ import annotations

import csv
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

CSV_PREFIX = "locust"
METRICS_BEFORE, METRICS_AFTER = "metrics_before.txt", "metrics_after.txt"
PLAYBACK_REQUEST_TYPE = "PLAYBACK"
# Session listeners' events (load_tests/locustfile.py, SessionListener): "open" (a failure:
# refused, the service was full) and "underrun" per clip (a failure: it came after the
# listener's audio ran out; its response time is the silence).
SESSION_REQUEST_TYPE = "SESSION"
NOT_HTTP = (PLAYBACK_REQUEST_TYPE, SESSION_REQUEST_TYPE)
AGGREGATED_NAME = "Aggregated"
BATCH_SIZE_METRIC = "riffusion_batch_size"
REQUEST_COLUMNS = (
    *("endpoint", "requests", "failures", "failure rate", "RPS"),
    *("p50 ms", "p95 ms", "p99 ms", "max ms"),
)
_STATUS_RE = re.compile(r"HTTP (\d{3})")


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
    avg_ms: float | None = None

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
    sessions: list[EndpointStats] = field(default_factory=list)

    def _session(self, name: str) -> EndpointStats | None:
        return next((s for s in self.sessions if s.name == name), None)

    @property
    def sessions_opened(self) -> int:
        opened = self._session("open")
        return opened.requests - opened.failures if opened else 0

    @property
    def sessions_refused(self) -> int:
        opened = self._session("open")
        return opened.failures if opened else 0

    @property
    def session_clips(self) -> int:
        clips = self._session("underrun")
        return clips.requests if clips else 0

    @property
    def underruns(self) -> int:
        clips = self._session("underrun")
        return clips.failures if clips else 0

    @property
    def underrun_s(self) -> float:
        """Silence heard in all: clips in time count 0 ms, so it is the mean times the count."""
        clips = self._session("underrun")
        return (clips.avg_ms or 0.0) * clips.requests / 1000 if clips else 0.0

    @property
    def longest_underrun_ms(self) -> float | None:
        clips = self._session("underrun")
        return clips.max_ms if clips and clips.failures else None

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
            if failure.request_type in NOT_HTTP:
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
            "sessions": {
                "opened": self.sessions_opened,
                "refused": self.sessions_refused,
                "clips": self.session_clips,
                "underruns": self.underruns,
                "underrun_s": self.underrun_s,
                "longest_underrun_ms": self.longest_underrun_ms,
            },
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
                avg_ms=_number(row.get("Average Response Time")),
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
        endpoints=[s for s in stats if s.request_type not in NOT_HTTP],
        sessions=[s for s in stats if s.request_type == SESSION_REQUEST_TYPE],
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
