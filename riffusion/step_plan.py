"""Step-level priority: which running jobs take the next denoising step.

Earliest-due-first admission orders the jobs that wait for a batch slot; once admitted,
every running job shares every step. On a CPU a step costs about in proportion to the
jobs in it, so a clip due in seconds (a listener's) beside clips due in minutes (the web
app's) would finish late. At every step boundary the engine asks ``plan_step``:

1. order the running jobs as the engine serves them (jobs promised real time, an
   admitted listener's, first; then earliest due first); the first one always steps;
2. take the next job too if stepping it beside those taken makes none of them late:
   predicted by running them to their ends (``finish_times``) with the measured cost of
   a step (a function of the work in it) and of post-processing (between steps on a CPU,
   where it delays everyone; overlapped with the steps on a GPU). A job that is late
   anyway counts as made late when the newcomer slows it by more than ``MATERIAL``,
   unless stepping them together lowers the worst lateness among them (a device whose
   batches cost less than their jobs one after another, in a burst where every clip is
   late: parked, the newcomer would be later still) and the job slowed is not one
   promised real time beside a newcomer that is not. With a backlog (jobs waiting for
   a batch slot) a newcomer also steps when that saves more than ``MATERIAL`` of its
   own device time, whoever not promised real time it makes late: a parked job keeps
   its slot, so parking on such a device spends the throughput the queue behind needs
   (past capacity the batch would shrink to one or two jobs and the queue grow without
   bound; ``bench/sim_schedules.py``);
3. otherwise park it and every job due after it: a parked job keeps its state and its
   slot, loses no work, and is planned again at the next step, so it resumes as soon as
   the jobs due sooner are safe. A job that would miss its deadline (and be dropped) if
   it waited behind the jobs taken is taken whatever it costs them.

Where a batched step costs about what one job's does, stepping another job makes nobody
late and nothing is parked; where it costs nearly what its jobs do in turn (a CPU, and
by the published figures SD 1.5 at 512 px on an A10G or H100 too), the plan orders jobs
by when they are due below capacity and keeps the batch whole past it. The decision
comes from the measured costs, never from the device's name. Before any step is
measured every cost is zero: nothing parks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

# A job already late counts as made late when a newcomer would slow it by more than this
# fraction of the time it has left (on a GPU another job in the step costs a few percent).
MATERIAL = 0.1


class Plannable(Protocol):
    """What the plan reads of a running job (``riffusion.engine.EngineJob`` has it)."""

    @property
    def due(self) -> float: ...  # when it should be answered (time.monotonic())

    @property
    def promised(self) -> bool: ...  # real time promised to its caller (a listener's clip)

    @property
    def rank(self) -> tuple[bool, float]: ...  # the order it is served in (promised first)

    @property
    def deadline(self) -> float: ...  # when it is dropped unanswered

    @property
    def steps_left(self) -> int: ...

    @property
    def work(self) -> int: ...  # latent pixels: what one of its steps costs


class Costs(Protocol):
    """Predicted seconds (``riffusion.engine.StepTimes``)."""

    def step_s(self, work: int) -> float: ...

    def postprocess_s(self, work: int) -> float: ...


J = TypeVar("J", bound=Plannable)


@dataclass(frozen=True)
class StepPlan(Generic[J]):
    stepped: list[J]  # run the next step, earliest due first
    parked: list[J]  # sit it out


def finish_times(
    jobs: Sequence[J], now: float, costs: Costs, inline_postprocess: bool
) -> dict[int, float]:
    """When each of ``jobs`` (by ``id``) would be answered if they stepped together from
    ``now`` until each is done, leaving the step as it finishes."""
    finished: dict[int, float] = {}
    left = {id(job): max(0, job.steps_left) for job in jobs}
    active = list(jobs)
    clock = now
    while active:
        steps = min(left[id(job)] for job in active)
        clock += steps * costs.step_s(sum(job.work for job in active))
        for job in active:
            left[id(job)] -= steps
        for job in (job for job in active if left[id(job)] == 0):
            if inline_postprocess:  # the engine thread decodes it before the next step
                clock += costs.postprocess_s(job.work)
                finished[id(job)] = clock
            else:
                finished[id(job)] = clock + costs.postprocess_s(job.work)
        active = [job for job in active if left[id(job)] > 0]
    return finished


def plan_step(
    running: Sequence[J],
    now: float,
    costs: Costs,
    inline_postprocess: bool,
    backlog: bool = False,
) -> StepPlan[J]:
    """Which of ``running`` step now and which are parked (see the module's docstring);
    ``backlog``: jobs wait for a batch slot."""
    ordered = sorted(running, key=lambda job: job.rank)  # stable: ties keep their order
    stepped: list[J] = []
    parked: list[J] = []
    planned: dict[int, float] = {}  # the stepped jobs' finish times
    for job in ordered:
        trial = finish_times([*stepped, job], now, costs, inline_postprocess)
        if not parked and not _harms(
            stepped, planned, trial, now, job, costs, inline_postprocess, backlog
        ):
            stepped, planned = [*stepped, job], trial
            continue
        # Parked: it resumes once the jobs taken are done, behind those parked before it.
        resume = max(planned.values(), default=now)
        waited = finish_times([*parked, job], resume, costs, inline_postprocess)
        if waited[id(job)] > job.deadline:  # parking would drop it: it steps regardless
            stepped = [*stepped, job]
            planned = finish_times(stepped, now, costs, inline_postprocess)
        else:
            parked.append(job)
    return StepPlan(stepped, parked)


def _harms(
    stepped: Sequence[Plannable],
    before: dict[int, float],
    after: dict[int, float],
    now: float,
    newcomer: Plannable,
    costs: Costs,
    inline_postprocess: bool,
    backlog: bool,
) -> bool:
    """Whether stepping ``newcomer`` beside ``stepped`` (their finish times ``before`` ->
    ``after``) harms one of them more than parking it would harm the rest (module
    docstring, 2.): makes one late that was on time, or slows one late anyway by more
    than ``MATERIAL``, unless that lowers the worst lateness (against ``newcomer`` parked
    until their last step) or, with a ``backlog``, saves device time that the jobs
    waiting behind them need; a promised job is never harmed for a newcomer not promised,
    nor made late to save device time."""
    made_late, slowed = [], []
    for job in stepped:
        was, will = before[id(job)], after[id(job)]
        if will <= job.due or will <= was:
            continue
        if was <= job.due:
            made_late.append(job)
        elif will - was > MATERIAL * (was - now):
            slowed.append(job)
    harmed = [*made_late, *slowed]
    if not harmed:
        return False
    if any(job.promised and not newcomer.promised for job in harmed):
        return True
    saving_may_decide = backlog and not any(job.promised for job in harmed)
    if made_late and not saving_may_decide:
        return True
    # Parked, it would start when their steps end (their post-processing, where it runs
    # beside the steps, delays nobody).
    steps_end = _steps_end(before, stepped, costs, inline_postprocess)
    alone = finish_times([newcomer], steps_end, costs, inline_postprocess)
    if saving_may_decide:
        apart_end = _steps_end(alone, [newcomer], costs, inline_postprocess)
        together_end = _steps_end(after, [*stepped, newcomer], costs, inline_postprocess)
        if apart_end - together_end > MATERIAL * (apart_end - steps_end):
            return False
    if made_late:
        return True
    worst_parked = max(
        alone[id(newcomer)] - newcomer.due, *(before[id(j)] - j.due for j in stepped)
    )
    worst_together = max(after[id(j)] - j.due for j in [*stepped, newcomer])
    return worst_together >= worst_parked


def _steps_end(
    finished: dict[int, float], jobs: Sequence[Plannable], costs: Costs, inline_postprocess: bool
) -> float:
    """When the last of ``jobs`` takes its last step, from their finish times."""
    return max(
        finished[id(job)] - (0.0 if inline_postprocess else costs.postprocess_s(job.work))
        for job in jobs
    )
