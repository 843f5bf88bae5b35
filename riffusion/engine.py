"""Real-time engine: step-level continuous batching with deadlines and cancellation.

Submissions wait in a queue ordered by when they are due (earliest first; a job is
due at its deadline unless its caller says it is due sooner), jobs whose caller was
promised real time (an admitted listener's) before all others. One thread owns
the pipeline on its device and repeats, at every step boundary:

1. drop jobs whose caller went away (cancelled) or whose deadline has passed (expired),
   waiting or running: they stop using the UNet within one step;
2. admit waiting jobs, earliest due first, while fewer than ``max_batch_size``
   run; admission prepares the job (text embeddings, seed-image latents, scheduler);
3. plan the step (``riffusion.step_plan``): every running job steps unless stepping it
   would make a job due sooner late, predicted from the measured step and
   post-processing times (on a CPU a step costs about in proportion to its jobs; on a
   GPU a batch saves each step's fixed part, so while jobs wait for a slot a newcomer
   that saves device time steps anyway, unless it would make a listener's clip late).
   A parked job keeps its state and slot, and steps again as soon as the jobs due sooner
   are safe, or when waiting longer would make it miss its own deadline
   (``step_priority=False``: all step);
4. run ONE denoising step for the jobs planned: one UNet forward per group of jobs
   that share a latent shape and text length, each job at its own timestep;
5. hand finished jobs to post-processing (VAE decode + Griffin-Lim) at once, on a
   thread of its own (``postprocess="thread"``) or between steps (``"inline"``),
   earliest due first, skipping jobs whose caller left meanwhile; a GPU
   decodes them together, a CPU one by one (each answered as soon as it is done).

Submitting refuses a job at once (``JobRefused``, with a retry hint) when its deadline
cannot be met, predicted from the measured step time, the jobs ahead of it and its
own steps. A job's result does not depend on when it joined or who it ran with: every
job keeps its own scheduler, noise and generators, and the UNet sees per-sample
timesteps, so neither its batch-mates nor being parked change its result. A failing job
fails alone; its batch-mates carry on.

The engine knows nothing of HTTP or metrics: it reports through an ``EngineObserver``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from riffusion.contracts import (
    EngineConfig,
    EngineObserver,
    EngineStopped,
    JobCancelled,
    JobExpired,
    JobRefused,
    PostProcessMode,
)
from riffusion.pipeline import GeneratedClip, JobState, RiffusionPipeline, group_by, step_groups
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.step_plan import plan_step
from riffusion.step_timer import StepTimer, synchronize

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineJob",
    "EngineObserver",
    "EngineStopped",
    "JobCancelled",
    "JobExpired",
    "JobRefused",
    "PostProcessMode",
]

logger = logging.getLogger(__name__)

# Weight of the newest sample in the step-time and post-processing averages.
EWMA_WEIGHT = 0.2


@dataclass(eq=False)
class EngineJob:
    """A submitted job and its progress; ``future`` resolves to the clip or an exception."""

    id: str
    job: GenerationJob
    deadline: float  # time.monotonic(): dropped (expired) once it passes
    submitted_at: float  # time.monotonic()
    due: float  # time.monotonic(): the order it is served in, earliest first (<= deadline)
    expected_steps: int
    work: int  # latent pixels: what one of its steps costs
    future: Future[GeneratedClip] = field(default_factory=Future)
    state: JobState | None = None
    admitted_at: float | None = None  # time.monotonic() of its first step
    cancel_requested: bool = False
    answered: bool = False
    promised: bool = False  # real time promised to its caller: served before the others

    @property
    def rank(self) -> tuple[bool, float]:
        """The order it is served in: promised jobs first, then earliest due first."""
        return (not self.promised, self.due)

    @property
    def prepared(self) -> JobState:
        """The job's pipeline state (it has one from admission on)."""
        if self.state is None:
            raise RuntimeError(f"job {self.id} has not been admitted")
        return self.state

    @property
    def steps_done(self) -> int:
        return self.state.steps_done if self.state is not None else 0

    @property
    def steps_left(self) -> int:
        return self.expected_steps - self.steps_done

    @property
    def unet_samples(self) -> int:
        """UNet samples spent on this job so far (two per step: guidance's two branches)."""
        return 2 * self.steps_done

    @property
    def wants_out(self) -> bool:
        return self.cancel_requested or self.future.cancelled()


def expected_steps(job: GenerationJob) -> int:
    """Denoising steps ``job`` will run: its plan's (``GenerationJob.num_steps``)."""
    return job.num_steps


class StepTimes:
    """Measured step and post-processing times, for predicting when a job would finish.

    A step costs a fixed overhead plus a part that grows with its work (the latent
    pixels of every job in it; a 5 s clip is 64 x 64). Steps are averaged per
    power-of-two bucket of work and a line is fitted through the buckets; with one
    bucket measured, its time is used as it is. Both err on the side of accepting a
    job: one that then cannot make its deadline expires rather than waiting forever.
    The engine thread observes while callers' threads predict: a lock keeps them apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[int, float] = {}  # bucket -> average seconds of a step
        self._work: dict[int, float] = {}  # bucket -> average work of a step
        self._postprocess_per_work = 0.0
        self._skipped_first = False
        self._line: tuple[float, float] | None = None  # (overhead, slope); None: refit

    @property
    def measured(self) -> bool:
        return bool(self._seconds)

    def observe(self, work: int, seconds: float) -> None:
        if not self._skipped_first:  # the first step pays one-off warm-up costs
            self._skipped_first = True
            return
        bucket = _bucket(work)
        with self._lock:
            self._seconds[bucket] = _ewma(self._seconds.get(bucket), seconds)
            self._work[bucket] = _ewma(self._work.get(bucket), work)
            self._line = None

    def observe_postprocess(self, work: int, seconds: float) -> None:
        self._postprocess_per_work = _ewma(self._postprocess_per_work or None, seconds / work)

    def step_s(self, work: int) -> float:
        """Predicted seconds of a step over ``work`` latent pixels (0 before any measurement)."""
        with self._lock:
            if len(self._seconds) < 2:
                return next(iter(self._seconds.values()), 0.0)
            # The step plan asks many times between two steps: the line is fitted once.
            if self._line is None:
                self._line = self._fit()
            overhead, slope = self._line
        return overhead + slope * work

    def step_s_at_most(self, work: int) -> float:
        """``step_s`` for promises that cannot be taken back (an admitted listener keeps its
        place): never under a step's cost while one batch size alone is measured.

        ``step_s`` then keeps that batch's time for any work, which errs toward accepting
        a job that may still expire; here a step over more work costs its share in
        proportion (a step costing a fixed part plus a part per work costs at most that).
        Once two batch sizes are measured, the fitted line, as ``step_s``.
        """
        with self._lock:
            only = next(iter(self._seconds.items())) if len(self._seconds) == 1 else None
            if only is not None:
                bucket, seconds = only
                return seconds * max(1.0, work / self._work[bucket])
        return self.step_s(work)

    def _fit(self) -> tuple[float, float]:
        """(overhead, slope) of the line through the buckets' averages."""
        points = [(self._work[b], self._seconds[b]) for b in self._seconds]
        mean_w = sum(w for w, _ in points) / len(points)
        mean_s = sum(t for _, t in points) / len(points)
        spread = sum((w - mean_w) ** 2 for w, _ in points)
        slope = max(0.0, sum((w - mean_w) * (t - mean_s) for w, t in points) / spread)
        return max(0.0, mean_s - slope * mean_w), slope

    def postprocess_s(self, work: int) -> float:
        return work * self._postprocess_per_work


def _bucket(work: int) -> int:
    return 1 << max(0, int(work) - 1).bit_length()


class Engine:
    """Continuous batching over a ``RiffusionPipeline``; ``submit`` from any thread."""

    def __init__(
        self,
        pipeline: RiffusionPipeline,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.step_times = StepTimes()
        self._step_timer = StepTimer(pipeline.device)
        self._lock = threading.Condition()  # over an RLock: submit_together nests submits
        self._waiting: list[tuple[tuple[bool, float], int, EngineJob]] = []  # by (rank, order)
        self._running: list[EngineJob] = []
        self._jobs: dict[str, EngineJob] = {}
        self._order = itertools.count()
        self._stopping = False
        self._reported_queue: tuple[int, int] | None = None  # last (waiting, running) reported
        self._postprocess_queue: queue.Queue[list[EngineJob] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name="riffusion-engine", daemon=True)]
        if self.config.postprocess == "thread":
            self._threads.append(
                threading.Thread(
                    target=self._postprocess_loop, name="riffusion-postprocess", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()

    # --- the caller's side -----------------------------------------------------------------------

    def submit(
        self,
        job: GenerationJob,
        timeout_s: float | None = None,
        job_id: str | None = None,
        due_s: float | None = None,
        waited_s: float = 0.0,
        promised: bool = False,
    ) -> EngineJob:
        """Queue ``job`` to finish within ``timeout_s``; raises ``JobRefused`` if it cannot.

        ``due_s`` (at most ``timeout_s``) orders it before jobs due later without making
        it expire then: a listener's clip is due when their buffer runs dry, and still
        wanted a little after. ``waited_s``: how long the job already waited before it
        got here (it counts in its queue wait, not in its deadline, which ``timeout_s`` sets).
        ``promised``: its caller was promised real time (an admitted listener): it is served
        before every job not promised, whatever their due times.
        """
        now = time.monotonic()
        timeout = self.config.default_timeout_s if timeout_s is None else timeout_s
        entry = EngineJob(
            id=job_id or uuid.uuid4().hex,
            job=job,
            deadline=now + timeout,
            submitted_at=now - max(0.0, waited_s),
            due=now + (timeout if due_s is None else min(max(due_s, 0.0), timeout)),
            expected_steps=job.num_steps,
            promised=promised,
            # Latent pixels, what one of its steps costs (seed images assumed 512 px wide).
            work=math.prod(job.latent_size(self.pipeline.vae_scale_factor)),
        )
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            predicted_s, start_s = self._predict(entry)
            if predicted_s > timeout:
                self.observer.on_outcome("refused", 0)
                raise JobRefused(
                    f"cannot finish within {timeout:.1f} s (predicted {predicted_s:.1f} s: "
                    f"{start_s:.1f} s until a batch slot frees, then {entry.expected_steps} steps)",
                    retry_after_s=max(1.0, math.ceil(predicted_s - timeout)),
                )
            self._jobs[entry.id] = entry
            heapq.heappush(self._waiting, (entry.rank, next(self._order), entry))
            self._lock.notify_all()
        return entry

    def submit_together(
        self,
        submissions: Sequence[
            tuple[GenerationJob, float | None, str | None, float, float | None, bool]
        ],
    ) -> list[EngineJob | JobRefused | EngineStopped]:
        """``submit`` each ``(job, timeout_s, job_id, waited_s, due_s, promised)`` at once:
        the engine thread sees all of them at its next step boundary (a batch gathered
        elsewhere stays one batch). A refused job gets its exception in its place."""
        entries: list[EngineJob | JobRefused | EngineStopped] = []
        with self._lock:  # reentrant: each submit takes it again
            for job, timeout_s, job_id, waited_s, due_s, promised in submissions:
                try:
                    entries.append(self.submit(job, timeout_s, job_id, due_s, waited_s, promised))
                except (JobRefused, EngineStopped) as error:
                    entries.append(error)
        return entries

    def cancel(self, job_id: str) -> bool:
        """Ask the engine to drop ``job_id`` at the next step boundary; False if unknown."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return False
            entry.cancel_requested = True
            self._lock.notify_all()
        return True

    def calibrate(self, steps: int = 3) -> dict[int, float]:
        """Measure a step of one job and of a full batch, before any job is submitted.

        ``StepTimes`` otherwise learns from the first requests: until then it knows no
        step (deadlines are not checked, only one listener is admitted, unmeasured) and
        then one batch size only. Calibrated, a replica prices a batch from its first
        second and can refuse even the first listener its device cannot serve. Default-
        width text-to-audio jobs step ``steps`` times at each size, the device
        synchronized around each step; a size's first step pays its shapes' one-off
        costs and is not counted. Not through the observer: no job ran. A size that
        fails (a full batch out of memory) is logged and left to be learned from
        requests, as the engine would meet it. Returns {jobs: seconds of its last step}.
        """
        measured: dict[int, float] = {}
        for jobs in sorted({1, self.config.max_batch_size}):
            try:
                measured[jobs] = self._calibrate_at(jobs, steps)
            except Exception as error:  # the engine splits a failing batch at run time
                logger.warning("step calibration at %d job(s) failed: %s", jobs, error)
        return measured

    def _calibrate_at(self, jobs: int, steps: int) -> float:
        states = [
            self.pipeline.prepare(GenerationJob(start=PromptInput(prompt="calibration", seed=i)))
            for i in range(jobs)
        ]
        work = sum(math.prod(state.latent_shape) for state in states)
        seconds = 0.0
        for step in range(steps):
            synchronize(self.pipeline.device)
            began = time.perf_counter()
            self.pipeline.denoise_step(states)
            synchronize(self.pipeline.device)
            seconds = time.perf_counter() - began
            if step > 0:
                self.step_times.observe(work, seconds)
        return seconds

    def queue_lengths(self) -> tuple[int, int]:
        """(waiting, running) jobs right now."""
        with self._lock:
            return len(self._waiting), len(self._running)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish running and waiting jobs that still can, refuse new ones, join the threads."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    def _predict(self, entry: EngineJob) -> tuple[float, float]:
        """(seconds to finish ``entry``, seconds until it starts), from measured step times.

        Simulates the batch slots: running jobs hold theirs for their remaining steps,
        jobs with earlier deadlines take the next free ones. Zero before any measurement.
        """
        times = self.step_times
        if not times.measured:
            return 0.0, 0.0
        ahead = [e for _, _, e in self._waiting if e.rank <= entry.rank]
        # The step it would run in: the running jobs and those ahead, up to the batch limit.
        sharing = [*self._running, *ahead][: self.config.max_batch_size - 1]
        step_s = times.step_s(sum(e.work for e in sharing) + entry.work)
        slots = [e.steps_left * step_s for e in self._running]
        slots += [0.0] * (self.config.max_batch_size - len(slots))
        heapq.heapify(slots)
        for other in sorted(ahead, key=lambda e: e.rank):
            heapq.heappush(slots, heapq.heappop(slots) + other.expected_steps * step_s)
        start_s = slots[0]
        finish_s = start_s + entry.expected_steps * step_s + times.postprocess_s(entry.work)
        return finish_s, start_s

    # --- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    if not self._running and not self._waiting:
                        if self._stopping:
                            break
                        self._report_queue()
                        self._lock.wait()
                        continue
                now = time.monotonic()
                self._drop_unwanted(now)  # 1.
                self._admit(now)  # 2.
                self._report_queue()
                if self._running:
                    finished = self._step(self._plan())  # 3., 4.
                    if finished:
                        self._postprocess(finished)  # 5.
        self._postprocess_queue.put(None)

    def _drop_unwanted(self, now: float) -> None:
        """Resolve cancelled and expired jobs, waiting or running, so they stop using the UNet."""
        with self._lock:
            kept = [item for item in self._waiting if not self._dropped(item[2], now)]
            if len(kept) != len(self._waiting):
                heapq.heapify(kept)
                self._waiting = kept
            self._running = [e for e in self._running if not self._dropped(e, now)]

    def _dropped(self, entry: EngineJob, now: float) -> bool:
        if entry.wants_out:
            self._resolve(entry, "cancelled", JobCancelled(f"job {entry.id} was cancelled"))
            return True
        if now >= entry.deadline:
            self._resolve(
                entry,
                "expired",
                JobExpired(
                    f"job {entry.id} missed its deadline after {entry.steps_done} of "
                    f"{entry.expected_steps} steps"
                ),
            )
            return True
        return False

    def _admit(self, now: float) -> None:
        """Prepare waiting jobs, earliest due first, into the free batch slots."""
        while len(self._running) < self.config.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                _, _, entry = heapq.heappop(self._waiting)
            try:
                entry.state = self.pipeline.prepare(entry.job)
            except Exception as error:  # one bad job fails alone
                logger.warning("job %s failed to prepare: %s", entry.id, error)
                self._resolve(entry, "failed", error)
                continue
            entry.expected_steps = entry.state.num_steps
            entry.work = math.prod(entry.state.latent_shape)
            entry.admitted_at = time.monotonic()
            self.observer.on_admitted(entry.admitted_at - entry.submitted_at)
            if entry.state.finished:  # zero denoising steps: straight to post-processing
                self._postprocess([entry])
            else:
                self._running.append(entry)

    def _plan(self) -> list[EngineJob]:
        """The running jobs that take the next step (the others are parked for it)."""
        if not self.config.step_priority or len(self._running) < 2:
            return list(self._running)  # a job alone always steps (``plan_step``'s rule 1)
        inline = self.config.postprocess == "inline"
        with self._lock:
            backlog = bool(self._waiting)
        plan = plan_step(self._running, time.monotonic(), self.step_times, inline, backlog)
        if plan.parked:
            self.observer.on_parked(len(plan.parked))
        return plan.stepped

    def _step(self, stepping: list[EngineJob]) -> list[EngineJob]:
        """One denoising step for ``stepping``; returns the running jobs that just finished."""
        began = time.monotonic()
        batch_size = len(stepping)
        work = sum(e.work for e in stepping)
        by_state = {id(e.prepared): e for e in stepping}
        timed = self._step_timer.begin()
        for group in step_groups([e.prepared for e in stepping]):
            self._step_group(group, by_state)
        self._step_timer.end(timed, work, batch_size)
        for step in self._step_timer.done():  # on CUDA: the device's time, a step or two late
            self.step_times.observe(step.work, step.seconds)
            self.observer.on_step(step.batch_size, step.seconds, 2 * step.batch_size)
        finished = [e for e in self._running if not e.answered and e.prepared.finished]
        self._running = [e for e in self._running if not e.answered and not e.prepared.finished]
        for entry in finished:
            entry.prepared.timings["denoise"] = time.monotonic() - (entry.admitted_at or began)
        return finished

    def _step_group(self, group: list[JobState], by_state: dict[int, EngineJob]) -> None:
        """One UNet forward for ``group``; if it raises, each job retries alone and fails alone."""
        steps_before = [state.steps_done for state in group]
        try:
            self.pipeline.denoise_step(group)
            return
        except Exception as error:
            if len(group) == 1:
                self._resolve(by_state[id(group[0])], "failed", error)
                return
            logger.warning(
                "a batched step failed (%s); stepping its %d jobs alone", error, len(group)
            )
        for state, steps in zip(group, steps_before, strict=True):
            if state.steps_done != steps:  # stepped before the failure
                continue
            try:
                self.pipeline.denoise_step([state])
            except Exception as error:
                self._resolve(by_state[id(state)], "failed", error)

    def _report_queue(self) -> None:
        """Tell the observer the queue lengths when they changed (most steps change neither)."""
        lengths = (len(self._waiting), len(self._running))  # len() of a list is atomic
        if lengths != self._reported_queue:
            self._reported_queue = lengths
            self.observer.on_queue(*lengths)

    # --- post-processing -------------------------------------------------------------------------

    def _postprocess(self, entries: list[EngineJob]) -> None:
        if self.config.postprocess == "thread":
            self._postprocess_queue.put(entries)
        else:
            self._finish(entries)

    def _postprocess_loop(self) -> None:
        with torch.inference_mode():
            while (entries := self._postprocess_queue.get()) is not None:
                self._finish(entries)

    def _finish(self, entries: Sequence[EngineJob]) -> None:
        """Decode and vocode finished jobs (one VAE call per latent shape), then answer them.

        Jobs whose caller left, or whose deadline passed, while they waited for this are
        dropped first: decode and Griffin-Lim cost more than the steps on a CPU.
        """
        now = time.monotonic()
        with self._lock:
            entries = sorted(
                (e for e in entries if not self._dropped(e, now)), key=lambda e: e.rank
            )
        # A GPU decodes and vocodes a group in one call for the price of one; on a CPU the
        # cost grows with every clip anyway, so each clip is answered as soon as it is done.
        batched = self.pipeline.policy.batch_together
        key = (lambda e: e.prepared.latent_shape) if batched else (lambda e: e.id)
        for group in group_by(entries, key).values():
            began = time.perf_counter()
            try:
                clips = self.pipeline.finish([e.prepared for e in group])
            except Exception as error:
                if len(group) > 1:  # find the job that breaks it; the others still get answers
                    for entry in group:
                        self._finish([entry])
                    continue
                self._resolve(group[0], "failed", error)
                continue
            work = sum(e.work for e in group)
            self.step_times.observe_postprocess(work, time.perf_counter() - began)
            now = time.monotonic()
            for entry, clip in zip(group, clips, strict=True):
                clip.timings["queue"] = (entry.admitted_at or now) - entry.submitted_at
                clip.timings["total"] = now - entry.submitted_at
                if now > entry.deadline:
                    self.observer.on_deadline_miss(now - entry.deadline)
                self._resolve(entry, "completed", clip)

    def _resolve(self, entry: EngineJob, outcome: str, result: GeneratedClip | Exception) -> None:
        """Answer ``entry`` exactly once and forget it."""
        with self._lock:
            if entry.answered:
                return
            entry.answered = True
            self._jobs.pop(entry.id, None)
        try:
            if isinstance(result, Exception):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)
        except InvalidStateError:  # the caller cancelled the future itself
            outcome = "cancelled"
        self.observer.on_outcome(outcome, entry.unet_samples)


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + EWMA_WEIGHT * (sample - previous)
