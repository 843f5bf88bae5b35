"""Prometheus metrics of both services, and the engine observer that feeds them.

Names are a contract (dashboards, the autoscaler, load tests and benchmarks parse
them). BentoML points prometheus_client at its multiprocess directory, so series
observed in the model service's process appear on the API service's /metrics.
Gauges sum over live processes only (``livesum``); ``forget_dead_processes`` drops
what a killed worker left behind, so a gauge never sticks after a restart. The API
service runs it before every scrape (``ForgetDeadOnScrape``): a killed model worker's
in-flight counts vanish at once, not when (or if) its successor starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from riffusion.contracts import EngineObserver

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    name="riffusion_batch_size",
    documentation="Jobs sharing one UNet forward, observed at every denoising step (every mode).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
QUEUE_WAIT = Histogram(
    name="riffusion_queue_wait_seconds",
    documentation="Time from the API service sending a clip to its first denoising step.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DENOISE_STEP = Histogram(
    name="riffusion_denoise_step_seconds",
    documentation="Wall time of one denoising step (one UNet call for the whole batch).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CLIP_LATENCY = Histogram(
    name="riffusion_clip_latency_seconds",
    documentation="Time from the API service sending a clip to receiving it back.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 15, 20, 30, 60, 120),
)
DEVICE_LOAD = Gauge(
    name="riffusion_device_load",
    documentation=(
        "The model service's predicted busy fraction of its device: admitted listeners' "
        "clips plus the last minute's per-request clips (1 = saturated). Sessions count "
        "whether or not a clip is in flight: an autoscaling signal that sees listeners."
    ),
    multiprocess_mode="livemax",
)
# Listener sessions (serving/sessions.py), kept by the API worker.
SESSIONS_ACTIVE = Gauge(
    name="riffusion_sessions_active",
    documentation="Listener sessions admitted and streaming on this API worker.",
    multiprocess_mode="livesum",
)
SESSIONS_REFUSED = Counter(
    name="riffusion_sessions_refused",
    documentation="Listener sessions refused at admission: the service was full.",
)
BUFFER_AHEAD = Histogram(
    name="riffusion_session_buffer_ahead_seconds",
    documentation="Audio a listener had buffered ahead when their next clip was sent.",
    buckets=(0, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30),
)
UNDERRUNS = Counter(
    name="riffusion_session_underruns",
    documentation="Clips that reached a listener after their buffer had run dry.",
)
UNDERRUN_SECONDS = Histogram(
    name="riffusion_session_underrun_seconds",
    documentation="How long a listener's buffer was dry before the next clip arrived.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


CLIPS_IN_FLIGHT = Gauge(
    name="riffusion_clips_in_flight",
    documentation=(
        "Clips the API service has sent to the model service and not yet had answered, "
        "cancelled or failed: the autoscaling signal (compare with the batch limit)."
    ),
    multiprocess_mode="livesum",
)
WAITING_JOBS = Gauge(
    name="riffusion_engine_waiting_jobs",
    documentation="Jobs waiting for a batch slot in the continuous-batching engine.",
    multiprocess_mode="livesum",
)
RUNNING_JOBS = Gauge(
    name="riffusion_engine_running_jobs",
    documentation="Jobs denoising in the continuous-batching engine.",
    multiprocess_mode="livesum",
)
JOB_EVENTS = Counter(
    name="riffusion_engine_jobs",
    documentation=(
        "Engine jobs by event: admitted, then one of completed, refused (deadline could "
        "not be met), expired (deadline passed), cancelled (caller gone) or failed."
    ),
    labelnames=("event",),
)
DEADLINE_MISSES = Counter(
    name="riffusion_deadline_misses",
    documentation="Clips answered after their deadline (post-processing overran it).",
)
UNET_SAMPLES = Counter(
    name="riffusion_unet_samples",
    documentation=(
        "UNet samples computed (two per job per step: guidance's two branches), by the "
        "job's outcome; cancelled and expired samples are work spent on abandoned clips."
    ),
    labelnames=("outcome",),
)
PARKED_JOB_STEPS = Counter(
    name="riffusion_engine_parked_job_steps",
    documentation=(
        "Running jobs that sat out a denoising step so that jobs due sooner stay on time "
        "(one per job per step; a CPU parks, a GPU steps everyone)."
    ),
)
UNET_EAGER_FALLBACKS = Counter(
    name="riffusion_unet_eager_fallbacks",
    documentation="UNet calls the traced or compiled backend could not serve and ran eager.",
)


class EngineMetrics(EngineObserver):
    """Feeds the engine's events into the metrics above."""

    def __init__(self, unet_forward: Any = None) -> None:
        self._unet_forward = unet_forward
        self._eager_calls_seen = 0

    def on_step(self, batch_size: int, seconds: float, unet_samples: int) -> None:
        BATCH_SIZE.observe(batch_size)
        DENOISE_STEP.observe(seconds)
        self.count_eager_fallbacks()

    def on_queue(self, waiting: int, running: int) -> None:
        WAITING_JOBS.set(waiting)
        RUNNING_JOBS.set(running)

    def on_admitted(self, wait_s: float) -> None:
        JOB_EVENTS.labels(event="admitted").inc()
        QUEUE_WAIT.observe(wait_s)

    def on_outcome(self, outcome: str, unet_samples: int) -> None:
        JOB_EVENTS.labels(event=outcome).inc()
        if unet_samples:
            UNET_SAMPLES.labels(outcome=outcome).inc(unet_samples)

    def on_deadline_miss(self, late_s: float) -> None:
        DEADLINE_MISSES.inc()

    def on_parked(self, jobs: int) -> None:
        PARKED_JOB_STEPS.inc(jobs)

    def count_eager_fallbacks(self) -> None:
        """Add the UNet backend's new eager calls (traced/compiled backends count them)."""
        eager_calls = int(getattr(self._unet_forward, "eager_calls", 0))
        if eager_calls > self._eager_calls_seen:
            UNET_EAGER_FALLBACKS.inc(eager_calls - self._eager_calls_seen)
            self._eager_calls_seen = eager_calls


_PID_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def forget_dead_processes(directory: str | None = None) -> list[int]:
    """Drop the live-gauge files of processes that are gone (a killed worker's in-flight counts).

    prometheus_client only does this for processes that exit cleanly; BentoML restarts a
    killed worker under a new pid, and its old files would keep their last values forever.
    """
    from prometheus_client import multiprocess

    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not Path(directory).is_dir():
        return []
    dead = set()
    for path in Path(directory).iterdir():
        match = _PID_FILE.match(path.name)
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in sorted(dead):
        # Another process (the API's scrape, a restarted worker) may remove them first.
        with contextlib.suppress(FileNotFoundError):
            multiprocess.mark_process_dead(pid, directory)
    if dead:
        logger.info("forgot the live gauges of dead processes %s", sorted(dead))
    return sorted(dead)


def _alive(pid: int) -> bool:
    """Running (a killed worker the supervisor has not reaped yet is a zombie: dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter follows the command name in /proc/<pid>/stat
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


class ForgetDeadOnScrape:
    """ASGI middleware: ``forget_dead_processes`` before each ``/metrics`` answer."""

    def __init__(self, app: ASGIApp, path: str = "/metrics") -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            try:
                forget_dead_processes()
            except OSError as error:  # never fail a scrape over it
                logger.warning("could not forget dead processes: %r", error)
        await self.app(scope, receive, send)


def publish_device_load(admission: Any, every_s: float = 1.0) -> threading.Thread:
    """Keep ``DEVICE_LOAD`` at ``admission.load()``, refreshed every ``every_s`` (a thread:
    the per-request part falls as requests age out of its window, with no event to tell)."""

    def refresh() -> None:
        while True:
            try:
                DEVICE_LOAD.set(admission.load())
            except Exception:  # a metric must never take the model service down
                logger.exception("could not refresh riffusion_device_load")
            time.sleep(every_s)

    thread = threading.Thread(target=refresh, name="riffusion-device-load", daemon=True)
    thread.start()
    return thread
