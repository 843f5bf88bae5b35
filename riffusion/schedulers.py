"""Diffusion schedulers: one fresh diffusers scheduler per job, and img2img timestep math.

Schedulers are stateful (step counters, multistep history), so every job in a
batch owns its own instance built from the checkpoint's ``scheduler_config``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from riffusion.batched_step import BatchedStepper, stepper_for
from riffusion.schemas import SchedulerName, img2img_steps

# diffusers schedulers share a duck-typed interface (set_timesteps, scale_model_input,
# step, add_noise) that SchedulerMixin does not declare, so they are typed as Any here.
Scheduler = Any

SCHEDULER_CLASSES: dict[SchedulerName, Any] = {
    SchedulerName.ddim: DDIMScheduler,
    SchedulerName.pndm: PNDMScheduler,
    SchedulerName.dpm_multistep: DPMSolverMultistepScheduler,
    SchedulerName.euler: EulerDiscreteScheduler,
    SchedulerName.euler_ancestral: EulerAncestralDiscreteScheduler,
    SchedulerName.lms: LMSDiscreteScheduler,
}


class SchedulerConfigError(ValueError):
    """The checkpoint's scheduler config names no usable scheduler class."""


def make_scheduler(name: SchedulerName | None, scheduler_config: Mapping[str, Any]) -> Scheduler:
    """A new scheduler: ``name``'s class, or the checkpoint's own when ``name`` is None."""
    if name is not None:
        return SCHEDULER_CLASSES[SchedulerName(name)].from_config(dict(scheduler_config))
    class_name = scheduler_config.get("_class_name")
    scheduler_class: Any = getattr(diffusers, str(class_name), None) if class_name else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise SchedulerConfigError(
            f"scheduler config names {class_name!r}, which is not a diffusers scheduler; "
            f"pick one of {[n.value for n in SchedulerName]}"
        )
    return cast(Any, scheduler_class).from_config(dict(scheduler_config))


@dataclass
class JobSchedule:
    """A job's scheduler set up for its steps, plus a twin that only adds noise.

    ``scheduler`` is stepped; ``noiser`` is never stepped, so its ``add_noise``
    looks the noise level up by timestep (sigma-based schedulers otherwise
    use their current step index once stepping has begun).
    """

    scheduler: Scheduler
    noiser: Scheduler
    timesteps: Tensor  # the timesteps this job runs, first to last
    # Steps this job together with others of its scheduler kind; None: it is stepped alone.
    stepper: BatchedStepper | None = None
    timestep_values: list[int | float] = field(init=False)  # ``timesteps`` as Python numbers

    def __post_init__(self) -> None:
        self.timestep_values = self.timesteps.tolist()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def add_noise(self, latents: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """``latents`` noised to ``timestep`` (a 0-d tensor) with ``noise``."""
        noisy: Tensor = self.noiser.add_noise(latents, noise, timestep.reshape(1))
        return noisy


def schedule_job(
    scheduler: Scheduler,
    num_inference_steps: int,
    denoising: float | None,
) -> JobSchedule:
    """Set ``scheduler`` up for text-to-image (``denoising=None``) or img2img.

    img2img follows the usual diffusers math: the job runs the last
    ``int(num_inference_steps * denoising)`` steps of the schedule (the
    scheduler's ``steps_offset`` is applied by ``set_timesteps``).
    """
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    noiser = copy.deepcopy(scheduler)
    all_timesteps: Tensor = scheduler.timesteps
    stepper = stepper_for(scheduler)
    if denoising is None:
        return JobSchedule(scheduler, noiser, all_timesteps, stepper)
    init_steps = img2img_steps(num_inference_steps, denoising)
    start = max(num_inference_steps - init_steps, 0) * scheduler.order
    timesteps = all_timesteps[start:] if init_steps > 0 else all_timesteps[:0]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return JobSchedule(scheduler, noiser, timesteps, stepper)


def step_accepts_generator(scheduler: Scheduler) -> bool:
    """Whether ``scheduler.step`` takes a ``generator`` (ancestral/stochastic samplers)."""
    scheduler_class = type(scheduler)
    accepts = _STEP_ACCEPTS_GENERATOR.get(scheduler_class)
    if accepts is None:  # inspect.signature costs ~30 us: once per class, not per job and step
        accepts = "generator" in inspect.signature(scheduler.step).parameters
        _STEP_ACCEPTS_GENERATOR[scheduler_class] = accepts
    return accepts


_STEP_ACCEPTS_GENERATOR: dict[type, bool] = {}


def scheduler_step(
    scheduler: Scheduler,
    noise_pred: Tensor,
    timestep: Tensor,
    latents: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """One denoising step; passes the job's own generator where the scheduler draws noise."""
    kwargs: dict[str, Any] = {"return_dict": False}
    if step_accepts_generator(scheduler):
        kwargs["generator"] = generator
    latents = scheduler.step(noise_pred, timestep, latents, **kwargs)[0]
    return latents
