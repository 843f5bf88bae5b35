"""Scheduler steps for many jobs at once, each job at its own step of its own schedule.

Every job keeps its own diffusers scheduler (step index, multistep history) and its own
generator; a ``BatchedStepper`` reads and updates that state for a group of jobs whose
schedulers share a class and config, and does the tensor arithmetic of the scheduler's
own ``step`` once for the group:

1. each job's coefficients for its step (sigmas, alphas and what diffusers derives from
   them) are computed with diffusers' formulas on 0-d tensors, exactly as its ``step``
   computes them for that job alone, and cached per point of a schedule;
2. they are stacked as per-sample (n, 1, 1, 1) tensors, and diffusers' tensor formula
   runs once on (n, 4, h, w);
3. jobs at different phases of a multistep method (PLMS warm-up, DPM-Solver's first
   order step) are computed in one group per phase;
4. each job's scheduler state (step index, history) is moved on only once every tensor
   of the step is computed, so a failed step leaves every job as it was.

Each element of a job's latents goes through the same float operations, on the same
float32 operands, as in ``scheduler.step`` for the job alone (where a formula is
written with in-place operations on temporaries, to spare the CPU fresh buffers, it
is the same operations in the same order; multiplications and additions swapped
operands at most, which IEEE arithmetic rounds alike): on a CPU its result is
bit-identical (tests/test_batched_step.py). On CUDA, PyTorch divides a tensor by a CPU
0-d tensor by multiplying with its reciprocal, so there the batched division may differ
from the per-job one by an ulp; a job's result still never depends on its batch-mates.

Schedulers or configs not reproduced here (LMS, SDE and third-order DPM-Solver,
thresholding, other prediction types) have no stepper: the pipeline steps them alone.
"""

from __future__ import annotations

import functools
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

Coefficients = tuple[float, ...]


class StepJob(NamedTuple):
    """What a stepper needs of one job for one step (built for every job at every step)."""

    scheduler: Any  # the job's own diffusers scheduler, stepped
    noiser: Any  # its never-stepped twin, for ``add_noise`` by timestep
    timesteps: Tensor  # the job's timesteps, first to last
    step: int  # the step it takes now (an index into ``timesteps``)
    timestep_value: int | float  # its timestep, as a Python number (cache key)
    generator: torch.Generator  # the job's own, for samplers that draw noise

    @property
    def timestep(self) -> Tensor:
        """0-d: the job's timestep at this step (made only where a stepper needs it)."""
        return self.timesteps[self.step]


class BatchedStepper(ABC):
    """One scheduler kind and config, stepped for a group of jobs with per-sample coefficients."""

    scheduler_class: ClassVar[type]
    scales_model_input: ClassVar[bool] = False
    draws_noise: ClassVar[bool] = False  # ``step`` draws from the jobs' generators

    def __init__(self) -> None:
        # Coefficients per point of a schedule: a few thousand floats at most per config.
        self._coefficients: dict[Hashable, Coefficients] = {}

    @classmethod
    def supports(cls, config: Any) -> bool:
        """Whether this stepper reproduces ``step`` for schedulers of this config."""
        return config.get("prediction_type", "epsilon") == "epsilon" and not config.get(
            "thresholding", False
        )

    def cached(
        self, key: Hashable, compute: Callable[[], Sequence[Tensor | float]]
    ) -> Coefficients:
        """``compute()``'s values as Python floats (exact for float32 and float64), cached."""
        found = self._coefficients.get(key)
        if found is None:
            found = tuple(float(value) for value in compute())
            self._coefficients[key] = found
        return found

    def scale_model_input(self, jobs: Sequence[StepJob], latents: Tensor) -> Tensor:
        """(n, 4, h, w) -> the UNet's input; identity unless ``scales_model_input``."""
        return latents

    @abstractmethod
    def step(
        self, jobs: Sequence[StepJob], model_output: Tensor, latents: Tensor
    ) -> tuple[Tensor, Callable[[], None]]:
        """One step of every job: (n, 4, h, w) guided noise and latents -> the next
        latents, and ``advance``, which moves each job's scheduler on by the step (the
        caller calls it once nothing can fail any more)."""

    @abstractmethod
    def noise_coefficients(self, job: StepJob) -> Coefficients:
        """(a, b) with ``noiser.add_noise(x, noise, t) == a * x + b * noise`` bit for bit."""

    def add_noise(self, jobs: Sequence[StepJob], original: Tensor, noise: Tensor) -> Tensor:
        """Each job's ``noiser.add_noise`` at its timestep, for (n, 4, h, w) tensors."""
        a, b = per_sample([self.noise_coefficients(job) for job in jobs], original)
        return a * original + b * noise


def per_sample(rows: Sequence[Coefficients], like: Tensor) -> tuple[Tensor, ...]:
    """n rows of K coefficients -> K tensors of shape (n, 1, 1, 1) in ``like``'s dtype/device
    (shared: never written)."""
    columns = [value for column in zip(*rows, strict=True) for value in column]
    return _per_sample(_packed(columns), (-1, len(rows), 1, 1, 1), like.dtype, like.device)


@functools.lru_cache(maxsize=4096)
def _per_sample(
    packed: bytes, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    return _constant(packed, shape, dtype, device).unbind()  # K tensors of (n, 1, 1, 1)


def constant(
    values: Sequence[float], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``torch.tensor(values, dtype=dtype).reshape(shape)`` on ``device``, made once per
    distinct values (a bounded cache): a step's coefficients and timesteps recur for every
    job that reaches the same point of the same schedule, so most steps build none and,
    on a GPU, copy none to it. The tensor is shared between callers: never written."""
    return _constant(_packed(values), shape, dtype, device)


def _packed(values: Sequence[float]) -> bytes:
    """``values`` as a cache key: exact (-0.0 and 0.0 differ), unpacked by ``_constant``."""
    return struct.pack(f"{len(values)}d", *values)


@functools.lru_cache(maxsize=4096)
def _constant(
    packed: bytes, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    values = struct.unpack(f"{len(packed) // 8}d", packed)
    return to_device(torch.tensor(values, dtype=dtype).reshape(shape), device)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on ``device`` without waiting for the device: a blocking copy to
    a GPU would first wait for the UNet forward queued before it, so the step's
    remaining CPU work could no longer overlap with it."""
    if device.type == "cpu":
        return tensor
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def row_views(tensor: Tensor) -> tuple[Tensor, ...]:
    """(n, ...) -> n views of shape (1, ...): ``tensor.split(1)``, in two C calls (none
    for one row: a job alone, the usual batch when traffic is light)."""
    if tensor.shape[0] == 1:
        return (tensor,)
    return tensor.unsqueeze(1).unbind()


def by_phase(phases: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Row indices grouped by phase, in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for row, phase in enumerate(phases):
        groups.setdefault(phase, []).append(row)
    return groups


def assemble(parts: dict[Hashable, tuple[list[int], Tensor]], n: int) -> Tensor:
    """One (n, ...) tensor from per-phase (rows, values); no copy when one phase has every row."""
    if len(parts) == 1:
        ((_, values),) = parts.values()
        return values
    first = next(iter(parts.values()))[1]
    out = first.new_empty((n, *first.shape[1:]))
    for rows, values in parts.values():
        out[rows] = values
    return out


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """(1, ...) tensors -> (n, ...): a view, without a copy, when they are consecutive rows
    of one tensor (what a batch's jobs keep of its last step while the batch stays the
    same), else a copy. Callers never write into the result."""
    first = tensors[0]
    if len(tensors) == 1 and first.shape[0] == 1:
        return first
    row = first.numel()
    if first.is_contiguous() and first.shape[0] == 1:
        storage = first.untyped_storage()
        start, row_bytes = first.data_ptr(), row * first.element_size()
        # Rows inside first's storage: a tensor that starts at one is in that storage
        # (live storages never overlap), so addresses, shapes and layout are enough.
        inside = start + len(tensors) * row_bytes <= storage.data_ptr() + storage.nbytes()
        if inside and all(
            tensor.data_ptr() == start + index * row_bytes
            and tensor.shape == first.shape
            and tensor.is_contiguous()
            for index, tensor in enumerate(tensors)
        ):
            shape = (len(tensors), *first.shape[1:])
            return first.as_strided(shape, (row, *first.stride()[1:]), first.storage_offset())
    return torch.cat(list(tensors))


class _AlphasCumprodNoise(BatchedStepper):
    """``add_noise`` of DDPM-style schedulers: sqrt(alpha_bar) x + sqrt(1 - alpha_bar) noise."""

    def noise_coefficients(self, job: StepJob) -> Coefficients:
        def compute() -> list[Tensor]:
            alphas_cumprod = job.noiser.alphas_cumprod.to(dtype=torch.float32)
            alpha_prod = alphas_cumprod[job.timestep_value]
            return [alpha_prod**0.5, (1 - alpha_prod) ** 0.5]

        key = ("noise", job.noiser.num_inference_steps, job.timestep_value)
        return self.cached(key, compute)


# PLMS's fourth-order weights: 55, -59, 37, -9 over 24 (``step_plms``).
PLMS_WEIGHTS: Coefficients = (55.0, 59.0, 37.0, 9.0, 1 / 24)


class PLMSStepper(_AlphasCumprodNoise):
    """``PNDMScheduler`` with ``skip_prk_steps`` (PLMS; the Riffusion checkpoint's own).

    ``step_plms``: the job's last four noise predictions combined by Adams-Bashforth
    weights (fewer during its warm-up, whose second step redoes the first), then
    ``_get_prev_sample``.
    """

    scheduler_class = PNDMScheduler

    @classmethod
    def supports(cls, config: Any) -> bool:
        return super().supports(config) and bool(config.get("skip_prk_steps", False))

    def _prev_sample_coefficients(self, job: StepJob) -> Coefficients:
        scheduler = job.scheduler
        counter_is_one = scheduler.counter == 1

        def compute() -> list[Tensor]:
            # step_plms's timesteps, then _get_prev_sample's coefficients.
            ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            timestep = int(job.timestep_value)
            prev_timestep = timestep - ratio
            if counter_is_one:
                prev_timestep = timestep
                timestep = timestep + ratio
            alpha_prod_t = scheduler.alphas_cumprod[timestep]
            alpha_prod_t_prev = (
                scheduler.alphas_cumprod[prev_timestep]
                if prev_timestep >= 0
                else scheduler.final_alpha_cumprod
            )
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
            model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
                alpha_prod_t * beta_prod_t * alpha_prod_t_prev
            ) ** (0.5)
            return [sample_coeff, alpha_prod_t_prev - alpha_prod_t, model_output_denom_coeff]

        key = (scheduler.num_inference_steps, job.timestep_value, counter_is_one)
        return self.cached(key, compute)

    def step(
        self, jobs: Sequence[StepJob], model_output: Tensor, latents: Tensor
    ) -> tuple[Tensor, Callable[[], None]]:
        n = len(jobs)
        # Phase: the job's counter, capped at 4 (0 and 1: the warm-up; then 2, 3, 4+ outputs).
        phases = [min(job.scheduler.counter, 4) for job in jobs]
        combined: dict[Hashable, tuple[list[int], Tensor]] = {}
        sample = latents
        for phase, rows in by_phase(phases).items():
            ets = [jobs[row].scheduler.ets for row in rows]  # before this step's append
            e1 = model_output if len(rows) == n else model_output[rows]
            if phase == 0:
                values = e1
            elif phase == 1:  # the warm-up's second step: back to the first step's sample
                values = (e1 + stacked([history[-1] for history in ets])) / 2
                sample = sample.clone() if sample is latents else sample
                sample[rows] = stacked([jobs[row].scheduler.cur_sample for row in rows])
            elif phase == 2:
                e2 = stacked([history[-1] for history in ets])
                values = (3 * e1 - e2) / 2
            elif phase == 3:
                e2, e3 = (stacked([history[-k] for history in ets]) for k in (1, 2))
                values = (23 * e1 - 16 * e2 + 5 * e3) / 12
            else:  # (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4), in two buffers
                e2, e3, e4 = (stacked([history[-k] for history in ets]) for k in (1, 2, 3))
                # The weights as float32 tensors, not Python numbers: the same products, by
                # the broadcast kernels the rest of the step uses (cheaper on a cold CPU).
                w55, w59, w37, w9, w24 = per_sample([PLMS_WEIGHTS], e1)
                values, term = torch.mul(e1, w55), torch.mul(e2, w59)
                values.sub_(term).add_(torch.mul(e3, w37, out=term))
                values.sub_(torch.mul(e4, w9, out=term)).mul_(w24)
            combined[phase] = (rows, values)
        combined_output = assemble(combined, n)

        sample_coeff, alpha_diff, denom = per_sample(
            [self._prev_sample_coefficients(job) for job in jobs], latents
        )
        # sample_coeff * sample - alpha_diff * combined_output / denom (the same ops, in place)
        prev_sample = sample_coeff * sample
        if combined_output is model_output:  # kept in the jobs' history: not to be written
            combined_output = alpha_diff * combined_output
        else:  # a temporary of this step
            combined_output.mul_(alpha_diff)
        prev_sample.sub_(combined_output.div_(denom))

        def advance() -> None:
            for job, output, job_sample in zip(
                jobs, row_views(model_output), row_views(latents), strict=True
            ):
                scheduler = job.scheduler
                if scheduler.counter != 1:
                    scheduler.ets = scheduler.ets[-3:]
                    scheduler.ets.append(output)
                if scheduler.counter == 0:
                    scheduler.cur_sample = job_sample
                elif scheduler.counter == 1:
                    scheduler.cur_sample = None
                scheduler.counter += 1

        return prev_sample, advance


class DDIMStepper(_AlphasCumprodNoise):
    """``DDIMScheduler`` with eta 0 (what ``scheduler_step`` asks for)."""

    scheduler_class = DDIMScheduler

    def _coefficients_for(self, job: StepJob) -> Coefficients:
        scheduler = job.scheduler

        def compute() -> list[Tensor]:
            timestep = int(job.timestep_value)
            prev_timestep = (
                timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            )
            alpha_prod_t = scheduler.alphas_cumprod[timestep]
            alpha_prod_t_prev = (
                scheduler.alphas_cumprod[prev_timestep]
                if prev_timestep >= 0
                else scheduler.final_alpha_cumprod
            )
            beta_prod_t = 1 - alpha_prod_t
            variance = scheduler._get_variance(timestep, prev_timestep)
            std_dev_t = 0.0 * variance ** (0.5)  # eta = 0
            return [
                beta_prod_t ** (0.5),
                alpha_prod_t ** (0.5),
                (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5),
                alpha_prod_t_prev ** (0.5),
            ]

        return self.cached((scheduler.num_inference_steps, job.timestep_value), compute)

    def step(
        self, jobs: Sequence[StepJob], model_output: Tensor, latents: Tensor
    ) -> tuple[Tensor, Callable[[], None]]:
        config = jobs[0].scheduler.config
        sqrt_beta, sqrt_alpha, direction, sqrt_alpha_prev = per_sample(
            [self._coefficients_for(job) for job in jobs], latents
        )
        pred_original_sample = (latents - sqrt_beta * model_output) / sqrt_alpha
        if config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -config.clip_sample_range, config.clip_sample_range
            )
        pred_sample_direction = direction * model_output
        prev_sample = sqrt_alpha_prev * pred_original_sample + pred_sample_direction
        return prev_sample, lambda: None  # DDIM keeps no state between steps


class _SigmaStepper(BatchedStepper):
    """Schedulers with a ``step_index`` into their sigmas (Euler, DPM-Solver)."""

    @staticmethod
    def step_index(job: StepJob) -> int:
        scheduler = job.scheduler
        if scheduler.step_index is None:
            scheduler._init_step_index(job.timestep)
        return int(scheduler.step_index)

    def noise_index(self, job: StepJob) -> int:
        noiser = job.noiser
        return int(noiser.index_for_timestep(job.timestep_value, noiser.timesteps))


class _EulerNoise(_SigmaStepper):
    """``add_noise`` of the Euler schedulers: x + noise * sigma (== 1.0 * x + sigma * noise)."""

    scales_model_input = True

    def noise_coefficients(self, job: StepJob) -> Coefficients:
        def compute() -> list[Tensor | float]:
            return [1.0, job.noiser.sigmas.to(dtype=torch.float32)[self.noise_index(job)]]

        key = ("noise", job.noiser.num_inference_steps, job.timestep_value)
        return self.cached(key, compute)

    def _scale_coefficients(self, job: StepJob) -> Coefficients:
        sigmas = job.scheduler.sigmas
        index = self.step_index(job)

        def compute() -> list[Tensor]:
            sigma = sigmas[index]
            return [(sigma**2 + 1) ** 0.5]

        return self.cached(("scale", job.scheduler.num_inference_steps, index), compute)

    def scale_model_input(self, jobs: Sequence[StepJob], latents: Tensor) -> Tensor:
        (scale,) = per_sample([self._scale_coefficients(job) for job in jobs], latents)
        for job in jobs:
            job.scheduler.is_scale_input_called = True
        return latents / scale

    @staticmethod
    def advancing(jobs: Sequence[StepJob]) -> Callable[[], None]:
        def advance() -> None:
            for job in jobs:
                job.scheduler._step_index += 1

        return advance

    @staticmethod
    def euler_update(model_output: Tensor, sample: Tensor, sigma: Tensor, dt: Tensor) -> Tensor:
        """The Euler schedulers' shared update, in one float32 buffer:

        pred_original_sample = sample - sigma * model_output
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * dt
        """
        values = sigma * model_output
        values = torch.sub(sample, values, out=values)  # pred_original_sample
        return torch.sub(sample, values, out=values).div_(sigma).mul_(dt).add_(sample)


class EulerStepper(_EulerNoise):
    """``EulerDiscreteScheduler`` with its default step arguments (no churn)."""

    scheduler_class = EulerDiscreteScheduler

    def _coefficients_for(self, job: StepJob) -> Coefficients:
        sigmas = job.scheduler.sigmas
        index = self.step_index(job)

        def compute() -> list[Tensor]:
            sigma = sigmas[index]
            gamma = 0.0  # s_churn = 0
            sigma_hat = sigma * (gamma + 1)
            return [sigma_hat, sigmas[index + 1] - sigma_hat]

        return self.cached((job.scheduler.num_inference_steps, index), compute)

    def step(
        self, jobs: Sequence[StepJob], model_output: Tensor, latents: Tensor
    ) -> tuple[Tensor, Callable[[], None]]:
        sigma_hat, dt = per_sample([self._coefficients_for(job) for job in jobs], latents)
        prev_sample = self.euler_update(model_output, latents.to(torch.float32), sigma_hat, dt)
        return prev_sample.to(model_output.dtype), self.advancing(jobs)


class EulerAncestralStepper(_EulerNoise):
    """``EulerAncestralDiscreteScheduler``: each job's noise drawn from its own generator."""

    scheduler_class = EulerAncestralDiscreteScheduler
    draws_noise = True

    def _coefficients_for(self, job: StepJob) -> Coefficients:
        sigmas = job.scheduler.sigmas
        index = self.step_index(job)

        def compute() -> list[Tensor]:
            sigma = sigmas[index]
            sigma_from = sigmas[index]
            sigma_to = sigmas[index + 1]
            sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            return [sigma, sigma_down - sigma, sigma_up]

        return self.cached((job.scheduler.num_inference_steps, index), compute)

    def step(
        self, jobs: Sequence[StepJob], model_output: Tensor, latents: Tensor
    ) -> tuple[Tensor, Callable[[], None]]:
        sigma, dt, sigma_up = per_sample([self._coefficients_for(job) for job in jobs], latents)
        prev_sample = self.euler_update(model_output, latents.to(torch.float32), sigma, dt)
        shape = (1, *model_output.shape[1:])
        noise = torch.cat(  # each job's draw from its own generator
            [
                randn_tensor(
                    shape,
                    dtype=model_output.dtype,
                    device=model_output.device,
                    generator=job.generator,
                )
                for job in jobs
            ]
        )
        prev_sample.add_(noise.mul_(sigma_up))  # prev_sample + noise * sigma_up
        return prev_sample.to(model_output.dtype), self.advancing(jobs)


class DPMSolverStepper(_SigmaStepper):
    """``DPMSolverMultistepScheduler``, DPM-Solver++ (2M, midpoint): first order on a job's
    first step and where diffusers lowers the order at the end, second order otherwise."""

    scheduler_class = DPMSolverMultistepScheduler

    @classmethod
    def supports(cls, config: Any) -> bool:
        return (
            super().supports(config)
            and config.get("algorithm_type") == "dpmsolver++"
            and config.get("solver_order") in (1, 2)
            and config.get("solver_type") == "midpoint"
            and not config.get("use_flow_sigmas", False)
            and config.get("variance_type") is None
        )

    def noise_coefficients(self, job: StepJob) -> Coefficients:
        noiser = job.noiser

        def compute() -> list[Tensor]:
            sigma = noiser.sigmas.to(dtype=torch.float32)[self.noise_index(job)]
            alpha_t, sigma_t = noiser._sigma_to_alpha_sigma_t(sigma)
            return [alpha_t, sigma_t]

        return self.cached(("noise", noiser.num_inference_steps, job.timestep_value), compute)

    def _coefficients_for(self, job: StepJob) -> tuple[bool, Coefficients]:
        scheduler = job.scheduler
        config = scheduler.config
        index = self.step_index(job)
        last = len(scheduler.timesteps)
        lower_order_final = (index == last - 1) and (
            config.euler_at_final
            or (config.lower_order_final and last < 15)
            or config.final_sigmas_type == "zero"
        )
        first_order = (
            config.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final
        )
        sigmas = scheduler.sigmas
        to_alpha_sigma = scheduler._sigma_to_alpha_sigma_t

        def compute() -> list[Tensor | float]:
            # convert_model_output (data prediction from the noise prediction)
            alpha_i, sigma_i = to_alpha_sigma(sigmas[index])
            alpha_t, sigma_t = to_alpha_sigma(sigmas[index + 1])
            alpha_s0, sigma_s0 = to_alpha_sigma(sigmas[index])
            lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
            lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
            h = lambda_t - lambda_s0
            if first_order:  # dpm_solver_first_order_update
                return [
                    sigma_i,
                    alpha_i,
                    sigma_t / sigma_s0,
                    alpha_t * (torch.exp(-h) - 1.0),
                    0.0,
                    0.0,
                ]
            # multistep_dpm_solver_second_order_update
            alpha_s1, sigma_s1 = to_alpha_sigma(sigmas[index - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            return [
                sigma_i,
                alpha_i,
                sigma_t / sigma_s0,
                alpha_t * (torch.exp(-h) - 1.0),
                0.5 * (alpha_t * (torch.exp(-h) - 1.0)),
                1.0 / r0,
            ]

        key = (scheduler.num_inference_steps, last, index, first_order)
        return first_order, self.cached(key, compute)

    def step(
        self, jobs: Sequence[StepJob], model_output: Tensor, latents: Tensor
    ) -> tuple[Tensor, Callable[[], None]]:
        n = len(jobs)
        orders, rows_coefficients = zip(*(self._coefficients_for(job) for job in jobs), strict=True)
        sigma_i, alpha_i, sample_coeff, d0_coeff, d1_coeff, inv_r0 = per_sample(
            rows_coefficients, latents
        )
        # convert_model_output: (sample - sigma_t * model_output) / alpha_t, in one buffer
        x0_pred = sigma_i * model_output
        torch.sub(latents, x0_pred, out=x0_pred).div_(alpha_i)
        sample = latents.to(torch.float32)

        parts: dict[Hashable, tuple[list[int], Tensor]] = {}
        for first_order, rows in by_phase(orders).items():

            def pick(tensor: Tensor, rows: list[int] = rows) -> Tensor:
                return tensor if len(rows) == n else tensor[rows]

            m0 = pick(x0_pred)
            values = pick(sample_coeff) * pick(sample)
            values.sub_(pick(d0_coeff) * m0)  # first order: done
            if not first_order:  # D1 = (1.0 / r0) * (m0 - m1); values - 0.5 (...) * D1
                m1 = stacked([jobs[row].scheduler.model_outputs[-1] for row in rows])
                values.sub_((m0 - m1).mul_(pick(inv_r0)).mul_(pick(d1_coeff)))
            parts[first_order] = (rows, values)
        prev_sample = assemble(parts, n)

        def advance() -> None:
            for job, output in zip(jobs, row_views(x0_pred), strict=True):
                scheduler = job.scheduler
                order = scheduler.config.solver_order
                for i in range(order - 1):
                    scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
                scheduler.model_outputs[-1] = output
                if scheduler.lower_order_nums < order:
                    scheduler.lower_order_nums += 1
                scheduler._step_index += 1

        return prev_sample.to(model_output.dtype), advance


STEPPER_CLASSES: tuple[type[BatchedStepper], ...] = (
    PLMSStepper,
    DDIMStepper,
    EulerStepper,
    EulerAncestralStepper,
    DPMSolverStepper,
)
_steppers: dict[Hashable, BatchedStepper] = {}


def stepper_for(scheduler: Any) -> BatchedStepper | None:
    """The shared stepper for ``scheduler``'s class and config, or None (step it alone)."""
    matching = [cls for cls in STEPPER_CLASSES if type(scheduler) is cls.scheduler_class]
    config = scheduler.config
    if not matching or not matching[0].supports(config):
        return None
    stepper_class = matching[0]
    key = (stepper_class, tuple(sorted((name, repr(value)) for name, value in config.items())))
    stepper = _steppers.get(key)
    if stepper is None:
        stepper = _steppers.setdefault(key, stepper_class())
    return stepper
