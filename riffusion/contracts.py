"""What a caller of the library needs to know without loading torch.

The API service validates requests and maps the model service's failures to HTTP
answers; it must never import torch, diffusers or transformers. This module holds
what both sides name: the option names (UNet backends, post-processing modes),
the engine's configuration, its observer hooks and the exceptions a job can end
with. :mod:`riffusion.engine`, :mod:`riffusion.pipeline` and
:mod:`riffusion.unet_backends` re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

UNetBackend = Literal["eager", "traced", "compiled"]
UNET_BACKENDS: tuple[str, ...] = get_args(UNetBackend)
# Engine post-processing: "thread" overlaps it with the next steps, "inline" runs it
# between steps (the pipeline's device policy picks the default: riffusion.device_policy).
PostProcessMode = Literal["thread", "inline"]


class InvalidJobError(ValueError):
    """A generation job that cannot run; the message names the job and the problem."""


class JobFieldError(ValueError):
    """A job refused before it runs; ``field`` is the dotted job field (``start.prompt``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class JobRefused(Exception):
    """The job's deadline cannot be met now; ``retry_after_s`` says when capacity may free up."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobExpired(Exception):
    """The job's deadline passed before it finished denoising."""


class JobCancelled(Exception):
    """The caller cancelled the job."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more jobs."""


@dataclass
class EngineConfig:
    """How the engine batches and post-processes."""

    max_batch_size: int = 8  # most jobs per denoising step (each is 2 UNet samples)
    postprocess: PostProcessMode = "thread"
    default_timeout_s: float = 300.0  # deadline of a job submitted without one
    # Park running jobs due later while stepping them would make a job due sooner late
    # (riffusion.step_plan); off: every running job steps every step.
    step_priority: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be positive, got {self.default_timeout_s}")


class EngineObserver:
    """Hooks the engine calls (from its own threads); the default does nothing."""

    def on_step(self, batch_size: int, seconds: float, unet_samples: int) -> None:
        """One denoising step ran for ``batch_size`` jobs."""

    def on_queue(self, waiting: int, running: int) -> None:
        """Queue lengths changed."""

    def on_admitted(self, wait_s: float) -> None:
        """A job started denoising ``wait_s`` after it was submitted."""

    def on_outcome(self, outcome: str, unet_samples: int) -> None:
        """A job left: completed, refused, expired, cancelled or failed, after ``unet_samples``."""

    def on_deadline_miss(self, late_s: float) -> None:
        """A job was answered ``late_s`` after its deadline."""

    def on_parked(self, jobs: int) -> None:
        """``jobs`` running jobs sat out a step so that jobs due sooner stay on time."""
