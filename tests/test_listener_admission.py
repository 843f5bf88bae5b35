"""Listener admission against the engine's step-time model (no device: times are given)."""

from __future__ import annotations

from typing import Any

import pytest

from riffusion.engine import StepTimes
from riffusion.listeners import RETRY_AFTER_S, Demand, ListenerAdmission

CLIP = Demand(steps=10, work=64 * 64, period_s=5.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def measured(step_s: float, per_work_s: float = 0.0, post_per_work_s: float = 0.0) -> StepTimes:
    """Step times of overhead ``step_s`` plus ``per_work_s`` per latent pixel."""
    times = StepTimes()
    times.observe(4096, 0.0)  # the warm-up step, ignored
    times.observe(4096, step_s + per_work_s * 4096)
    times.observe(4 * 4096, step_s + per_work_s * 4 * 4096)
    if post_per_work_s:
        times.observe_postprocess(4096, post_per_work_s * 4096)
    return times


def admission(times: StepTimes, clock: Clock, batch: int = 8, **kwargs: Any) -> ListenerAdmission:
    return ListenerAdmission(
        times, max_batch_size=batch, overlapped_postprocess=False, clock=clock, **kwargs
    )


def test_listeners_are_admitted_while_their_clips_fit_in_real_time() -> None:
    # CPU-like: a step costs in proportion to its work, 0.1 s per clip-step; 10 steps =
    # 1 s of device per 5 s clip, so at 80 % four listeners fit and the fifth is refused.
    clock = Clock()
    gate = admission(measured(0.0, per_work_s=0.1 / 4096), clock)
    decisions = [gate.open(f"l{i}", CLIP) for i in range(5)]
    assert [d.accepted for d in decisions] == [True, True, True, True, False]
    refused = decisions[-1]
    assert refused.retry_after_s == RETRY_AFTER_S
    assert "full" in refused.message and "retry in 30 s" in refused.message
    assert refused.load == pytest.approx(1.0)
    assert gate.listeners() == 4
    # A listener leaving frees a place for the next one.
    assert gate.close("l0")
    assert gate.open("l5", CLIP).accepted


def test_batching_that_costs_nothing_extra_admits_up_to_the_batch_limit() -> None:
    # GPU-like: a step costs the same at any batch size; 8 jobs share each step.
    clock = Clock()
    gate = admission(measured(0.1), clock, batch=8)
    assert all(gate.open(f"l{i}", CLIP).accepted for i in range(16))  # 2 batches: 2 s of 5
    assert gate.load() == pytest.approx(0.4)


def test_post_processing_counts_after_the_steps_on_a_cpu() -> None:
    clock = Clock()
    gate = admission(measured(0.0, per_work_s=0.1 / 4096, post_per_work_s=1.0 / 4096), clock)
    # 1 s of steps + 1 s of decode and Griffin-Lim per clip: two listeners are 80 %.
    assert [gate.open(f"l{i}", CLIP).accepted for i in range(3)] == [True, True, False]


def test_per_request_traffic_counts_against_new_listeners_but_is_never_refused() -> None:
    clock = Clock()
    gate = admission(measured(0.0, per_work_s=0.1 / 4096), clock, window_s=60.0)
    clock.now += 60.0
    for _ in range(24):  # 24 clips a minute: 2 per 5 s period, 0.4 of the device
        gate.note_request(CLIP)
    assert [gate.open(f"l{i}", CLIP).accepted for i in range(3)] == [True, True, False]
    # Once the requests are older than the window they no longer count.
    clock.now += 61.0
    assert gate.open("l9", CLIP).accepted


def test_before_any_measurement_only_one_listener_is_admitted() -> None:
    gate = admission(StepTimes(), Clock())
    assert gate.open("first", CLIP).accepted
    second = gate.open("second", CLIP)
    assert not second.accepted and "measured" in second.message


def test_with_one_batch_size_measured_a_larger_batch_is_priced_in_proportion() -> None:
    # A fresh replica after its first listener's steps: one clip's step measured, 0.1 s.
    # Whether batching is cheap on this device is not known yet, so a burst of listeners
    # is priced as if a batch of n cost n such steps: four fit at 80 % (10 steps each,
    # 1 s of a 5 s period apiece), not the 16 a flat 0.1 s per step at any batch admits.
    times = StepTimes()
    times.observe(4096, 0.0)  # the warm-up step, ignored
    times.observe(4096, 0.1)
    assert times.step_s(8 * 4096) == pytest.approx(0.1)  # the engine's own, optimistic
    assert times.step_s_at_most(8 * 4096) == pytest.approx(0.8)
    assert times.step_s_at_most(4096 // 2) == pytest.approx(0.1)  # less work: no less
    gate = admission(times, Clock(), batch=8)
    decisions = [gate.open(f"l{i}", CLIP) for i in range(6)]
    assert [d.accepted for d in decisions] == [True] * 4 + [False] * 2
    # The device then shows a batch of four costing one clip's step: the line, as measured.
    times.observe(4 * 4096, 0.1)
    assert times.step_s_at_most(8 * 4096) == pytest.approx(times.step_s(8 * 4096))
    assert all(gate.open(f"m{i}", CLIP).accepted for i in range(12))  # 16 in two batches


def test_a_listener_whose_lease_lapses_is_forgotten_and_renewal_keeps_it() -> None:
    clock = Clock()
    gate = admission(measured(0.0, per_work_s=0.1 / 4096), clock, lease_s=30.0)
    gate.open("kept", CLIP)
    gate.open("gone", CLIP)
    clock.now += 20.0
    assert gate.renew("kept") and not gate.renew("stranger")
    clock.now += 15.0
    assert gate.listeners() == 1
    assert not gate.close("gone") and gate.close("kept")


def test_opening_twice_keeps_one_place() -> None:
    gate = admission(measured(0.0, per_work_s=0.1 / 4096), Clock())
    assert gate.open("same", CLIP).accepted and gate.open("same", CLIP).accepted
    assert gate.listeners() == 1


def test_without_prediction_the_cap_alone_decides() -> None:
    slow = measured(0.0, per_work_s=10.0 / 4096)  # one clip: 100 s of device per 5 s
    assert not admission(slow, Clock()).open("l0", CLIP).accepted
    gate = admission(slow, Clock(), max_listeners=2, predict=False)
    assert [gate.open(f"l{i}", CLIP).accepted for i in range(3)] == [True, True, False]


def test_an_operators_cap_refuses_past_it_whatever_the_prediction() -> None:
    gate = admission(measured(0.0, per_work_s=0.001 / 4096), Clock(), max_listeners=2)
    assert [gate.open(f"l{i}", CLIP).accepted for i in range(3)] == [True, True, False]
    assert "at most 2 listener" in gate.open("l3", CLIP).message
