"""Jobs stepped together by a ``BatchedStepper`` equal each job stepped alone, bit for bit.

The UNet is replaced by an elementwise function of each sample's own inputs (latents,
timestep, text embedding) built from correctly rounded float operations, so a batch
cannot change what the UNet predicts for a job: any difference between a job in a
batch and the job alone comes from the scheduler step, guidance or mask blend. The
reference is the per-job path (``batched_scheduler_steps=False``: each job's own
``scheduler.step``), with each job alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from riffusion.batched_step import (
    BatchedStepper,
    DDIMStepper,
    DPMSolverStepper,
    EulerAncestralStepper,
    EulerStepper,
    PLMSStepper,
)
from riffusion.models import build_tiny_components
from riffusion.pipeline import JobState, RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput, SchedulerName
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import SpectrogramParams
from tests.test_pipeline import write_library


class ElementwiseUNet:
    """A stand-in denoiser whose output for a sample depends on that sample alone."""

    def __call__(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        t = (timesteps / 1000).reshape(-1, 1, 1, 1)  # (2B, 1, 1, 1)
        text = text_embeddings[:, 0, :4].reshape(-1, 4, 1, 1).float()  # (2B, 4, 1, 1)
        return 0.7 * latents + text * t - 0.05 * latents * latents


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> SeedImageLibrary:
    return write_library(tmp_path_factory.mktemp("seed_images"))


@pytest.fixture(scope="module")
def pipeline(library: SeedImageLibrary) -> RiffusionPipeline:
    pipeline = RiffusionPipeline(
        build_tiny_components(device="cpu"),
        seed_images=library,
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=1),
    )
    pipeline.unet_forward = ElementwiseUNet()
    return pipeline


JAZZ = PromptInput(prompt="smooth jazz with piano", seed=11, guidance=6.0, denoising=0.6)
DRUMS = PromptInput(
    prompt="(heavy:1.3) drums", seed=22, negative_prompt="vocals", guidance=3.0, denoising=0.8
)

STEPPERS: dict[SchedulerName | None, type[BatchedStepper]] = {
    None: PLMSStepper,  # the checkpoint's own (PNDM), what the web app uses
    SchedulerName.ddim: DDIMStepper,
    SchedulerName.euler: EulerStepper,
    SchedulerName.euler_ancestral: EulerAncestralStepper,
    SchedulerName.dpm_multistep: DPMSolverStepper,
}


def jobs_for(scheduler: SchedulerName | None) -> list[GenerationJob]:
    """Text and seed-image jobs of one latent shape: steps, guidance, strength, seeds, masks."""

    def job(**fields: object) -> GenerationJob:
        values: dict[str, object] = {"start": JAZZ, "width": 64, "scheduler": scheduler}
        values.update(fields)
        return GenerationJob.model_validate(values)

    seed = {"seed_image_id": "narrow_beat"}
    return [
        job(num_inference_steps=6),
        job(start=DRUMS, end=JAZZ, alpha=0.3, num_inference_steps=9),
        job(num_inference_steps=8, **seed),
        job(start=DRUMS, num_inference_steps=12, mask_image_id="left_white", **seed),
        job(start=DRUMS.model_copy(update={"seed": 5, "guidance": 9.5}), num_inference_steps=16),
        job(num_inference_steps=5, mask_image_id="all_black", **seed),
        job(start=JAZZ.model_copy(update={"denoising": 0.3}), num_inference_steps=10, **seed),
    ]


def drive(
    pipeline: RiffusionPipeline,
    jobs: Sequence[GenerationJob],
    joins: Sequence[int],
    batched: Callable[[int], bool],
) -> list[JobState]:
    """Step jobs as the engine does: job i joins at step ``joins[i]``, finished jobs leave;
    step k is stepped together when ``batched(k)``, else one job at a time."""
    states: list[JobState | None] = [None] * len(jobs)
    step = 0
    with torch.inference_mode():
        while step <= max(joins) or any(s is not None and not s.finished for s in states):
            for index, (job, join) in enumerate(zip(jobs, joins, strict=True)):
                if join == step:
                    states[index] = pipeline.prepare(job, index)
            running = [s for s in states if s is not None and not s.finished]
            if running:
                pipeline.batched_scheduler_steps = batched(step)
                pipeline.denoise_step(running)
            step += 1
    pipeline.batched_scheduler_steps = True
    return [state for state in states if state is not None]


def alone(pipeline: RiffusionPipeline, job: GenerationJob, batched: bool) -> Tensor:
    (state,) = drive(pipeline, [job], [0], lambda step: batched)
    return state.latents


@pytest.mark.parametrize("scheduler", list(STEPPERS), ids=lambda name: str(name or "default"))
def test_jobs_stepped_together_equal_each_job_stepped_alone(
    pipeline: RiffusionPipeline, scheduler: SchedulerName | None
) -> None:
    jobs = jobs_for(scheduler)
    joins = [0, 0, 1, 3, 2, 7, 4]
    together = drive(pipeline, jobs, joins, lambda step: True)
    assert all(type(s.schedule.stepper) is STEPPERS[scheduler] for s in together)
    assert len({s.num_steps for s in together}) > 4  # jobs leave at different steps

    for job, state in zip(jobs, together, strict=True):
        assert state.finished
        reference = alone(pipeline, job, batched=False)  # the job's own scheduler.step
        assert torch.equal(state.latents, reference)
        assert torch.equal(alone(pipeline, job, batched=True), reference)
    distinct = {tuple(s.latents.flatten()[:8].tolist()) for s in together}
    assert len(distinct) == len(jobs)


def test_a_mixed_batch_steps_each_kind_together_and_the_rest_alone(
    pipeline: RiffusionPipeline,
) -> None:
    kinds = [*STEPPERS, SchedulerName.lms]  # LMS has no stepper: stepped alone
    jobs = [jobs_for(kind)[row % 7] for row, kind in enumerate(kinds * 2)]
    joins = [row % 4 for row in range(len(jobs))]
    together = drive(pipeline, jobs, joins, lambda step: True)
    assert {type(s.schedule.stepper) for s in together} == {*STEPPERS.values(), type(None)}
    for job, state in zip(jobs, together, strict=True):
        assert torch.equal(state.latents, alone(pipeline, job, batched=False))


def test_a_job_can_switch_between_stepped_together_and_alone_mid_way(
    pipeline: RiffusionPipeline,
) -> None:
    """Each job's state lives in its own scheduler, whichever path stepped it."""
    jobs = [job for kind in STEPPERS for job in jobs_for(kind)[2:5]]
    joins = [row % 3 for row in range(len(jobs))]
    switching = drive(pipeline, jobs, joins, lambda step: step % 3 != 1)
    for job, state in zip(jobs, switching, strict=True):
        assert torch.equal(state.latents, alone(pipeline, job, batched=False))


@pytest.mark.parametrize("batched", [True, False], ids=["together", "alone"])
def test_a_job_that_takes_a_leaving_jobs_place_steps_with_its_own_inputs(
    pipeline: RiffusionPipeline, batched: bool
) -> None:
    """A batch's text embeddings and guidance are built once while its jobs stay the same:
    when a job joins as another leaves (a batch of the same size), the step uses the
    newcomer's own prompt and guidance, not the leaver's."""
    base = jobs_for(None)[0]
    leaver = base.model_copy(update={"num_inference_steps": 3})
    stayer = base.model_copy(update={"start": DRUMS, "num_inference_steps": 8})
    newcomer = base.model_copy(
        update={"start": JAZZ.model_copy(update={"prompt": "harp", "guidance": 11.0})}
    )
    jobs = [leaver, stayer, newcomer]
    states = drive(pipeline, jobs, joins=[0, 0, 3], batched=lambda step: batched)
    for job, state in zip(jobs, states, strict=True):
        assert torch.equal(state.latents, alone(pipeline, job, batched=False))


@pytest.mark.parametrize("scheduler", [SchedulerName.dpm_multistep, SchedulerName.euler_ancestral])
def test_a_failed_batched_step_leaves_every_job_as_it_was(
    pipeline: RiffusionPipeline, monkeypatch: pytest.MonkeyPatch, scheduler: SchedulerName
) -> None:
    """The engine steps each job alone after a failed step: nothing of a job (latents,
    scheduler history, generator) may have moved, so each still ends as if alone."""
    jobs = jobs_for(scheduler)[2:5]  # the middle one has a mask: its blend fails below
    stepper_class = STEPPERS[scheduler]
    with torch.inference_mode():
        states = [pipeline.prepare(job, index) for index, job in enumerate(jobs)]
        for _ in range(2):
            pipeline.denoise_step(states)

        def failing(*args: object) -> Tensor:
            raise RuntimeError("out of memory")

        before = [(s.steps_done, s.latents, s.schedule.scheduler.step_index) for s in states]
        with monkeypatch.context() as patch:
            patch.setattr(stepper_class, "add_noise", failing)
            with pytest.raises(RuntimeError, match="out of memory"):
                pipeline.denoise_step(states)
        assert [
            (s.steps_done, s.latents, s.schedule.scheduler.step_index) for s in states
        ] == before

        for state in states:
            while not state.finished:
                pipeline.denoise_step([state])
    for job, state in zip(jobs, states, strict=True):
        assert torch.equal(state.latents, alone(pipeline, job, batched=False))
