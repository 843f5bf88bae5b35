"""The step plan on its own: who steps and who is parked, from a cost model and a clock.

Costs are fixed functions here (no measurement, no threads), so every prediction is
exact: "late" means predicted late by the same model the plan uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from riffusion.step_plan import finish_times, plan_step

NOW = 1000.0


@dataclass(eq=False)
class Job:
    name: str
    due: float
    steps_left: int
    work: int = 4096
    deadline: float = NOW + 300.0
    promised: bool = False

    @property
    def rank(self) -> tuple[bool, float]:
        return (not self.promised, self.due)


class Costs:
    """A step costs ``overhead_s`` plus ``per_job_s`` for each 64 x 64 clip in it."""

    def __init__(self, overhead_s: float, per_job_s: float, postprocess_s: float = 0.0) -> None:
        self.overhead_s, self.per_job_s, self.post_s = overhead_s, per_job_s, postprocess_s

    def step_s(self, work: int) -> float:
        return self.overhead_s + self.per_job_s * work / 4096

    def postprocess_s(self, work: int) -> float:
        return self.post_s * work / 4096


CPU = Costs(overhead_s=0.0, per_job_s=0.1, postprocess_s=0.5)  # a step costs per clip
GPU = Costs(overhead_s=0.1, per_job_s=0.0, postprocess_s=0.05)  # a batch costs as one


def names(jobs: list[Job]) -> list[str]:
    return [job.name for job in jobs]


def listener_and_requests(listener_due_s: float = 1.4) -> list[Job]:
    # Admitted earlier: three web-app clips due at the request timeout; then a
    # listener's clip due soon, 5 steps from its end.
    requests = [Job(f"request {i}", due=NOW + 300, steps_left=10) for i in range(3)]
    return [*requests, Job("listener", due=NOW + listener_due_s, steps_left=5)]


def test_on_a_cpu_later_jobs_are_parked_while_they_would_make_a_sooner_one_late() -> None:
    jobs = listener_and_requests()
    everyone = finish_times(jobs, NOW, CPU, inline_postprocess=True)
    # Everyone stepping: 5 steps of 0.4 s, then its decode: 2.5 s, due in 1.4 s.
    assert everyone[id(jobs[3])] == pytest.approx(NOW + 2.5)
    plan = plan_step(jobs, NOW, CPU, inline_postprocess=True)
    # Alone it takes 1.0 s; with one request beside it 5 x 0.2 + 0.5 = 1.5 s, late.
    assert names(plan.stepped) == ["listener"]
    assert names(plan.parked) == ["request 0", "request 1", "request 2"]


def test_later_jobs_step_beside_a_sooner_one_as_long_as_it_stays_on_time() -> None:
    jobs = listener_and_requests(listener_due_s=2.1)
    plan = plan_step(jobs, NOW, CPU, inline_postprocess=True)
    # Two requests beside it: 5 x 0.3 + 0.5 = 2.0 s (on time); three: 2.5 s (late).
    assert names(plan.stepped) == ["listener", "request 0", "request 1"]
    assert names(plan.parked) == ["request 2"]


def test_a_request_about_to_finish_is_parked_when_its_decode_would_make_a_listener_late() -> None:
    request = Job("request", due=NOW + 300, steps_left=1)
    listener = Job("listener", due=NOW + 1.15, steps_left=5)
    # Stepped, the request finishes now and its 0.5 s decode (between steps, on a CPU)
    # comes before the listener's next steps: 0.2 + 0.5 + 4 x 0.1 + 0.5 = 1.6 s.
    plan = plan_step([request, listener], NOW, CPU, inline_postprocess=True)
    assert names(plan.parked) == ["request"]
    # Decoded on a thread of its own, overlapped with the steps, it delays nobody else's
    # answer by more than its step: 0.2 + 4 x 0.1 + 0.5 = 1.1 s, on time.
    plan = plan_step([request, listener], NOW, CPU, inline_postprocess=False)
    assert names(plan.stepped) == ["listener", "request"] and not plan.parked


def test_on_a_gpu_where_a_batch_costs_as_one_nothing_is_parked() -> None:
    jobs = listener_and_requests(listener_due_s=0.2)  # late whatever happens
    plan = plan_step(jobs, NOW, GPU, inline_postprocess=False)
    assert names(plan.stepped) == ["listener", "request 0", "request 1", "request 2"]
    assert not plan.parked
    # Nor on a GPU whose bigger steps cost a little more (2 % of a step per clip).
    costs = Costs(overhead_s=0.1, per_job_s=0.002, postprocess_s=0.05)
    assert not plan_step(jobs, NOW, costs, inline_postprocess=False).parked


def test_a_job_late_anyway_is_still_favoured_when_others_would_slow_it_much() -> None:
    jobs = listener_and_requests(listener_due_s=0.5)  # alone it needs 1.0 s
    plan = plan_step(jobs, NOW, CPU, inline_postprocess=True)
    assert names(plan.stepped) == ["listener"]


def test_a_parked_job_steps_regardless_when_waiting_would_make_it_miss_its_deadline() -> None:
    # Parked behind the listener's 1.0 s, the request needs 10 x 0.1 + 0.5 = 1.5 s more:
    # it ends at 2.5 s, before a deadline in 3 s but not before one in 2 s.
    listener = Job("listener", due=NOW + 1.4, steps_left=5)
    patient = Job("request", due=NOW + 3.0, deadline=NOW + 3.0, steps_left=10)
    plan = plan_step([patient, listener], NOW, CPU, inline_postprocess=True)
    assert names(plan.parked) == ["request"]
    urgent = Job("request", due=NOW + 2.0, deadline=NOW + 2.0, steps_left=10)
    plan = plan_step([urgent, listener], NOW, CPU, inline_postprocess=True)
    assert names(plan.stepped) == ["listener", "request"] and not plan.parked


def test_a_listener_promised_real_time_comes_before_clips_due_sooner_but_not_promised() -> None:
    """A web-app clip is due when its clip would have played (seconds), sooner than a
    listener's with a buffer ahead; but the admitted listener was promised real time: it
    steps first, and the web-app clip is parked while it would make the listener late."""
    listener = Job("listener", due=NOW + 1.4, steps_left=5, promised=True)
    web_app = Job("web app", due=NOW + 1.0, steps_left=5)
    plan = plan_step([web_app, listener], NOW, CPU, inline_postprocess=True)
    assert names(plan.stepped) == ["listener"] and names(plan.parked) == ["web app"]
    # Not promised, the listener would be served after the clip due sooner.
    listener.promised = False
    plan = plan_step([web_app, listener], NOW, CPU, inline_postprocess=True)
    assert names(plan.stepped) == ["web app"] and names(plan.parked) == ["listener"]


def test_among_clips_not_promised_one_due_sooner_parks_those_that_would_make_it_late() -> None:
    """Web-app clips due when they would have played: the earlier one is not slowed into
    lateness by a later arrival, which waits (the later one is still well within its
    deadline)."""
    first = Job("web app 1", due=NOW + 1.4, steps_left=5)
    second = Job("web app 2", due=NOW + 6.5, steps_left=10)
    plan = plan_step([second, first], NOW, CPU, inline_postprocess=True)
    assert names(plan.stepped) == ["web app 1"] and names(plan.parked) == ["web app 2"]


def test_before_any_step_is_measured_everyone_steps() -> None:
    unmeasured = Costs(overhead_s=0.0, per_job_s=0.0)
    plan = plan_step(listener_and_requests(0.0), NOW, unmeasured, inline_postprocess=True)
    assert len(plan.stepped) == 4 and not plan.parked


def test_jobs_due_at_the_same_time_keep_their_order_and_the_first_always_steps() -> None:
    jobs = [Job(f"clip {i}", due=NOW + 0.1, steps_left=5) for i in range(3)]
    plan = plan_step(jobs, NOW, CPU, inline_postprocess=True)
    assert names(plan.stepped) == ["clip 0"]
    assert names(plan.parked) == ["clip 1", "clip 2"]


# A device whose batch of two costs less than the two one after another (0.25 s against
# 0.3 s a step), as an A10G's does (11.5 ms a step plus 47 ms a clip), post-processing
# overlapped with the steps.
BATCHING = Costs(overhead_s=0.05, per_job_s=0.1, postprocess_s=0.05)


def test_in_a_burst_where_every_clip_is_late_they_step_together_where_a_batch_costs_less() -> None:
    # Alone, the first ends at 5 x 0.15 + 0.05 = 0.8 s and the second, parked until its
    # steps end (0.75 s), at 1.55 s; together both end at 5 x 0.25 + 0.05 = 1.3 s: the
    # worst lateness falls.
    jobs = [Job(f"clip {i}", due=NOW + 0.1, steps_left=5) for i in range(2)]
    plan = plan_step(jobs, NOW, BATCHING, inline_postprocess=False)
    assert names(plan.stepped) == ["clip 0", "clip 1"] and not plan.parked
    # Where the batch costs what its clips do (a CPU), together they end no sooner.
    plan = plan_step(jobs, NOW, CPU, inline_postprocess=False)
    assert names(plan.stepped) == ["clip 0"] and names(plan.parked) == ["clip 1"]


def test_a_clip_on_time_alone_is_still_not_made_late_to_spare_a_later_one() -> None:
    # Together both end at 1.3 s: the first late by 0.4 s; parked, the second ends at
    # 1.55 s, late by 0.6 s. The worst lateness would fall, but the first stays on time.
    first = Job("clip 0", due=NOW + 0.9, steps_left=5)  # on time alone (0.8 s)
    second = Job("clip 1", due=NOW + 0.95, steps_left=5)
    plan = plan_step([first, second], NOW, BATCHING, inline_postprocess=False)
    assert names(plan.stepped) == ["clip 0"] and names(plan.parked) == ["clip 1"]


def test_a_late_listener_is_not_slowed_for_a_clip_not_promised_but_is_for_another_listener() -> (
    None
):
    listener = Job("listener", due=NOW + 0.1, steps_left=5, promised=True)
    web_app = Job("web app", due=NOW + 0.1, steps_left=5)
    plan = plan_step([web_app, listener], NOW, BATCHING, inline_postprocess=False)
    assert names(plan.stepped) == ["listener"] and names(plan.parked) == ["web app"]
    other = Job("listener 2", due=NOW + 0.1, steps_left=5, promised=True)
    plan = plan_step([other, listener], NOW, BATCHING, inline_postprocess=False)
    assert names(plan.stepped) == ["listener 2", "listener"] and not plan.parked


def test_with_a_backlog_a_clip_on_time_is_made_late_where_batching_saves_device_time() -> None:
    # The clips above again, with jobs waiting for a slot: apart, the device is busy
    # until 0.75 + 0.75 = 1.5 s; together until 1.25 s. Parked, the second would hold its
    # slot through the first's steps and give the queue behind a quarter of a second less.
    first = Job("clip 0", due=NOW + 0.9, steps_left=5)
    second = Job("clip 1", due=NOW + 0.95, steps_left=5)
    plan = plan_step([first, second], NOW, BATCHING, inline_postprocess=False, backlog=True)
    assert names(plan.stepped) == ["clip 0", "clip 1"] and not plan.parked
    # Where a batch costs what its clips do (a CPU) nothing is saved: it stays parked.
    first, second = (Job(f"clip {i}", due=NOW + 0.55, steps_left=5) for i in range(2))
    plan = plan_step([first, second], NOW, CPU, inline_postprocess=False, backlog=True)
    assert names(plan.stepped) == ["clip 0"] and names(plan.parked) == ["clip 1"]


def test_with_a_backlog_a_late_clip_far_from_its_end_still_shares_its_steps() -> None:
    # Late both, the first 2 s late and 2 steps from its end, the newcomer 5: apart their
    # steps end at 0.3 s and 1.05 s; together at 0.5 s and 0.95 s. The worst lateness
    # rises (the first's, by 0.2 s), so without a backlog the newcomer is parked; with
    # one, the 0.1 s of device time saved goes to the jobs waiting.
    first = Job("clip 0", due=NOW - 2.0, steps_left=2)
    newcomer = Job("clip 1", due=NOW - 0.1, steps_left=5)
    plan = plan_step([first, newcomer], NOW, BATCHING, inline_postprocess=False)
    assert names(plan.stepped) == ["clip 0"] and names(plan.parked) == ["clip 1"]
    plan = plan_step([first, newcomer], NOW, BATCHING, inline_postprocess=False, backlog=True)
    assert names(plan.stepped) == ["clip 0", "clip 1"] and not plan.parked


@pytest.mark.parametrize("newcomer_promised", [False, True])
def test_with_a_backlog_a_listener_is_still_never_made_late_to_save_device_time(
    newcomer_promised: bool,
) -> None:
    listener = Job("listener", due=NOW + 0.9, steps_left=5, promised=True)  # on time alone
    newcomer = Job("newcomer", due=NOW + 0.95, steps_left=5, promised=newcomer_promised)
    plan = plan_step([listener, newcomer], NOW, BATCHING, inline_postprocess=False, backlog=True)
    assert names(plan.stepped) == ["listener"] and names(plan.parked) == ["newcomer"]
