"""Listener admission: accept a real-time listener only if everyone admitted stays in real time.

A listener needs one clip per clip length (5.12 s at the default width), forever.
``ListenerAdmission`` holds the listeners the engine has promised that to and the
recent rate of per-request clips (the web app, the API) that share the same device,
and decides at ``open``:

1. the demand of one period: every listener's next clip, plus the per-request clips
   expected in the same time (their rate over the last ``window_s``);
2. its cost from the engine's measured step times (``StepTimes.step_s_at_most``): the
   clips run in full batches of ``max_batch_size``, each batch for its jobs' steps,
   plus their decode and Griffin-Lim (after the steps on a CPU, overlapped with them
   on a GPU). While the engine has measured one batch size alone (a fresh replica after
   its first listener's steps), a larger batch is priced in proportion to its work,
   not at the measured batch's time: no burst of listeners is admitted on a batching
   gain the device has not shown yet;
3. accept if that cost fits in ``utilization`` of the shortest period (and the
   listeners stay within ``max_listeners``, an operator's cap), else refuse with a
   retry hint. With ``predict`` off the cap alone decides (step times that say nothing
   of the device's capacity: a machine shared with other work). Admitted listeners keep
   their place: a later one is refused, never the other way round. Before any step is
   measured only one listener fits.

Listeners hold a lease renewed by each clip they ask for; one whose API worker died
without closing it is forgotten after ``lease_s``. Per-request traffic is never refused
here; it is counted so that new listeners are refused while it keeps the device busy.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from riffusion.api_schemas import ListenerDecision
from riffusion.engine import StepTimes
from riffusion.schemas import DEFAULT_WIDTH, GenerationJob

RETRY_AFTER_S = 30.0  # listeners stay for minutes: the hint for a refused one


@dataclass(frozen=True)
class Demand:
    """One clip of ``steps`` denoising steps over ``work`` latent pixels, every ``period_s``."""

    steps: int
    work: int
    period_s: float


def demand_of(job: GenerationJob, vae_scale_factor: int, step_ms: float = 10.0) -> Demand:
    """One clip like ``job`` every clip length (one image pixel per ``step_ms``)."""
    width = DEFAULT_WIDTH if job.is_img2img else job.width
    work = math.prod(job.latent_size(vae_scale_factor))
    return Demand(job.num_steps, work, width * step_ms / 1000)


class ListenerAdmission:
    """Admitted listeners, per-request clip rate, and the real-time check (thread-safe)."""

    def __init__(
        self,
        step_times: StepTimes,
        max_batch_size: int,
        overlapped_postprocess: bool,
        utilization: float = 0.8,
        max_listeners: int | None = None,
        predict: bool = True,
        vae_scale_factor: int = 8,
        lease_s: float = 60.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {utilization}")
        self.step_times = step_times
        self.max_batch_size = max_batch_size
        self.overlapped_postprocess = overlapped_postprocess
        self.utilization = utilization
        self.max_listeners = max_listeners
        self.predict = predict
        self.vae_scale_factor = vae_scale_factor
        self.lease_s = lease_s
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._listeners: dict[str, tuple[Demand, float]] = {}  # id -> (demand, lease expiry)
        self._requests: deque[tuple[float, Demand]] = deque()  # (seen at, demand)
        self._started_at = clock()

    # --- what the model service calls ----------------------------------------------------------

    def demand(self, job: GenerationJob) -> Demand:
        """A listener (or a per-request client) asking for clips like ``job``."""
        return demand_of(job, self.vae_scale_factor)

    def open(self, listener_id: str, demand: Demand) -> ListenerDecision:
        """Admit ``listener_id`` if every admitted listener, it included, stays in real time."""
        with self._lock:
            now = self.clock()
            self._forget_expired(now)
            if listener_id in self._listeners:
                self._listeners[listener_id] = (demand, now + self.lease_s)
                return ListenerDecision(
                    accepted=True,
                    listeners=len(self._listeners),
                    load=self._load(now),
                    message="already admitted",
                )
            others = [d for d, _ in self._listeners.values()]
            load = self._load(now, [*others, demand])
            why = None
            if self.max_listeners is not None and len(others) >= self.max_listeners:
                why = f"it serves at most {self.max_listeners} listener(s)"
            elif not self.predict:
                pass  # the operator's cap alone decides
            elif not self.step_times.measured and others:
                why = "the first listener's clips are still being measured"
            elif load > self.utilization:
                why = (
                    f"another listener would need {load:.0%} of the device "
                    f"(at most {self.utilization:.0%} keeps {len(others)} admitted in real time)"
                )
            if why is not None:
                return ListenerDecision(
                    accepted=False,
                    listeners=len(others),
                    load=load,
                    message=f"the service is full: {why}; retry in {RETRY_AFTER_S:.0f} s "
                    "or connect to another replica",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._listeners[listener_id] = (demand, now + self.lease_s)
            return ListenerDecision(
                accepted=True, listeners=len(self._listeners), load=load, message="admitted"
            )

    def renew(self, listener_id: str) -> bool:
        """Extend ``listener_id``'s lease (each clip it asks for); False if it is not admitted."""
        with self._lock:
            entry = self._listeners.get(listener_id)
            if entry is None:
                return False
            self._listeners[listener_id] = (entry[0], self.clock() + self.lease_s)
            return True

    def close(self, listener_id: str) -> bool:
        """Free ``listener_id``'s place; False if it held none."""
        with self._lock:
            return self._listeners.pop(listener_id, None) is not None

    def note_request(self, demand: Demand) -> None:
        """A per-request clip (not a listener's) was submitted now."""
        with self._lock:
            self._requests.append((self.clock(), demand))

    def listeners(self) -> int:
        with self._lock:
            self._forget_expired(self.clock())
            return len(self._listeners)

    def load(self) -> float:
        """Predicted busy fraction of the device for the admitted listeners and recent requests."""
        with self._lock:
            now = self.clock()
            self._forget_expired(now)
            return self._load(now)

    # --- the prediction --------------------------------------------------------------------------

    def _load(self, now: float, listeners: Iterable[Demand] | None = None) -> float:
        demands = list(listeners) if listeners is not None else self._admitted()
        if not demands and not self._requests:
            return 0.0
        period_s = min((d.period_s for d in demands), default=5.12)
        # Per-request clips expected within one period, at their recent rate.
        while self._requests and self._requests[0][0] < now - self.window_s:
            self._requests.popleft()
        observed_s = max(1.0, min(self.window_s, now - self._started_at))
        expected = len(self._requests) * period_s / observed_s
        jobs = [(d.steps, d.work) for d in demands]
        if self._requests:
            mean_steps = sum(d.steps for _, d in self._requests) / len(self._requests)
            mean_work = sum(d.work for _, d in self._requests) / len(self._requests)
            whole = math.floor(expected)
            jobs += [(round(mean_steps), round(mean_work))] * whole
            if expected > whole:  # a fraction of a clip: a partial step cost
                jobs.append((round(mean_steps * (expected - whole)), round(mean_work)))
        return self._busy_s(jobs) / period_s

    def _busy_s(self, jobs: list[tuple[int, int]]) -> float:
        """Device seconds for ``jobs`` (steps, work) run in full batches, longest first."""
        times = self.step_times
        jobs = sorted(jobs, reverse=True)
        denoise_s = 0.0
        for first in range(0, len(jobs), self.max_batch_size):
            batch = jobs[first : first + self.max_batch_size]
            denoise_s += batch[0][0] * times.step_s_at_most(sum(work for _, work in batch))
        post_s = sum(times.postprocess_s(work) for _, work in jobs)
        return max(denoise_s, post_s) if self.overlapped_postprocess else denoise_s + post_s

    def _admitted(self) -> list[Demand]:
        return [demand for demand, _ in self._listeners.values()]

    def _forget_expired(self, now: float) -> None:
        for listener_id in [i for i, (_, expiry) in self._listeners.items() if expiry <= now]:
            del self._listeners[listener_id]
