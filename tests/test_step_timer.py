"""riffusion/step_timer.py: what the engine learns of its steps' cost, on a CPU and on CUDA.

CUDA's timing events are stood in for here by events on a fake device clock that the
test moves on (tests/test_cuda.py times real ones against a busy GPU).
"""

from __future__ import annotations

import time

import pytest

from riffusion.step_timer import StepTimer, TimedStep


def test_on_a_cpu_a_step_costs_its_wall_time_at_once() -> None:
    timer = StepTimer("cpu")
    step = timer.begin()
    time.sleep(0.02)
    timer.end(step, work=4096, batch_size=1)
    [timed] = timer.done()
    assert (timed.work, timed.batch_size) == (4096, 1)
    assert 0.02 <= timed.seconds < 1.0
    assert timer.done() == []  # each step once


class FakeDevice:
    """A stream whose clock the test moves: an event is passed once ``now`` reaches the
    time the device gets to it (its queued work before it done)."""

    def __init__(self) -> None:
        self.now = 0.0  # seconds of device time run so far
        self.queued_until = 0.0  # when the work queued so far ends

    def queue(self, seconds: float) -> None:
        self.queued_until = max(self.queued_until, self.now) + seconds

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.at: float | None = None

    def record(self) -> None:
        self.at = max(self.device.queued_until, self.device.now)

    def query(self) -> bool:
        assert self.at is not None
        return self.device.now >= self.at

    def elapsed_time(self, end_event: FakeEvent) -> float:
        assert self.query() and end_event.query()  # torch raises before both are passed
        assert self.at is not None and end_event.at is not None
        return (end_event.at - self.at) * 1000  # milliseconds, as torch gives them


def test_on_cuda_a_step_costs_the_device_time_between_its_events_once_passed() -> None:
    device = FakeDevice()
    timer = StepTimer("cuda", event_factory=device.event)
    # Two steps queued in a millisecond of host time each: the device needs 60 and 20 ms.
    first = timer.begin()
    device.queue(0.060)
    timer.end(first, work=4 * 4096, batch_size=4)
    second = timer.begin()
    device.queue(0.020)
    timer.end(second, work=4096, batch_size=1)
    assert timer.done() == []  # the device has passed neither yet: nothing waits for it
    device.now = 0.070  # the first step done, the second still running
    assert timer.done() == [TimedStep(4 * 4096, 4, pytest.approx(0.060))]
    device.now = 0.080
    assert timer.done() == [TimedStep(4096, 1, pytest.approx(0.020))]
    assert timer.done() == []
