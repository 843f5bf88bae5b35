"""How long each engine step took the device, without making the host wait for it.

The engine learns its step costs from its own steps (``StepTimes``: deadlines, the step
plan, listener admission). On a CPU a step's wall time is its cost. On CUDA it is not:
nothing in a step waits for the device (the UNet's kernels, the scheduler arithmetic,
the per-sample coefficients all queue on the stream), so the host's time around a step
is the time to queue its kernels: about a millisecond after an idle spell, the device's
time only once the queue is full, and then another step's. Synchronizing at every step
would measure it at the cost of the overlap between the host's next step and the
device's current one. So on CUDA:

1. ``begin`` records a timing event on the current stream before the step's kernels,
   ``end`` one after them, and keeps the pair with the step's work and batch size;
2. ``done`` returns the steps whose end event the device has passed (``Event.query``:
   never a wait), in order, each with the device time between its two events; the
   engine calls it after every step, so a step's time arrives a step or two late.

On a CPU the same two calls take ``HostEvent``s: the host's clock, passed as soon as
recorded, so ``done`` returns each step at once with its wall time.

The device time between the events includes any kernels another thread queued on the
same stream meanwhile (the post-processing thread's decodes): the device was busy with
them during the step, as a step's wall time on a CPU includes whatever shares its core.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class TimingEvent(Protocol):
    """What ``torch.cuda.Event(enable_timing=True)`` offers and the timer uses."""

    def record(self) -> Any: ...

    def query(self) -> bool: ...

    def elapsed_time(self, end_event: Any) -> float: ...


class HostEvent:
    """A timing event on the host's clock, passed as soon as it is recorded (a CPU's
    step is done when its call returns)."""

    def __init__(self) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: HostEvent) -> float:
        return (end_event.at - self.at) * 1000  # milliseconds, as CUDA's events give them


@dataclass(frozen=True)
class TimedStep:
    work: int  # latent pixels of every job in the step
    batch_size: int  # jobs in the step
    seconds: float


@dataclass(frozen=True)
class _Pending:
    start: TimingEvent
    end: TimingEvent
    work: int
    batch_size: int


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times engine steps: wall time on a CPU, the device's own on CUDA (see the module)."""

    def __init__(
        self,
        device: torch.device | str,
        event_factory: Callable[[], TimingEvent] | None = None,
    ) -> None:
        if event_factory is None:
            on_cuda = torch.device(device).type == "cuda"
            event_factory = (lambda: torch.cuda.Event(enable_timing=True)) if on_cuda else HostEvent
        self._new_event = event_factory
        self._pending: deque[_Pending] = deque()

    def begin(self) -> TimingEvent:
        """Before a step's work is queued."""
        start = self._new_event()
        start.record()
        return start

    def end(self, start: TimingEvent, work: int, batch_size: int) -> None:
        """After the step's work is queued."""
        end = self._new_event()
        end.record()
        self._pending.append(_Pending(start, end, work, batch_size))

    def done(self) -> list[TimedStep]:
        """The steps whose time is known since the last call, oldest first."""
        finished = []
        while self._pending and self._pending[0].end.query():
            step = self._pending.popleft()
            seconds = step.start.elapsed_time(step.end) / 1000  # elapsed_time is in ms
            finished.append(TimedStep(step.work, step.batch_size, seconds))
        return finished
