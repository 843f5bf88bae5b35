"""Batched Riffusion diffusion over heterogeneous generation jobs.

``RiffusionPipeline.run(jobs)`` turns a list of ``GenerationJob`` into
spectrogram images and audio. The steps, in order:

1. validate every job (seed/mask ids, init images) before any compute;
2. prepare each job on its own: text embeddings lerped between the start and
   end inputs (negative prompts likewise, for the unconditional branch),
   guidance and denoising lerped, noise slerped between the two seeds' noise,
   the seed image VAE-encoded, the mask reduced to the latent grid, and a
   scheduler of the job's own;
3. denoise: at every step the unfinished jobs go in batches of one latent shape
   and text length (``step_groups``; the real-time engine drives the same step):
   each job of a batch adds its latents twice (unconditional, conditional) to ONE
   UNet forward with a per-sample timestep (``denoise_step``), then steps its own
   scheduler, then re-applies its mask (jobs sharing a scheduler kind do both at
   once with per-sample coefficients, riffusion/batched_step.py); jobs with fewer
   steps drop out early;
4. ``finish``: decode the latents (on a GPU all of a shape in one VAE call; on
   a CPU one clip at a time, to bound memory), read the pixels as mel
   amplitudes and run Griffin-Lim with a generator per job;
5. normalise loudness and return one ``GeneratedClip`` per job, in job order.

Per-job randomness comes from generators seeded by the job's own seeds and
drawn on the CPU, so a job's result does not depend on its batch-mates or on
the device's RNG.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from riffusion.audio import Audio, normalize_loudness
from riffusion.batched_step import (
    BatchedStepper,
    StepJob,
    constant,
    row_views,
    stacked,
)
from riffusion.contracts import InvalidJobError
from riffusion.device_policy import device_policy
from riffusion.heap import release_freed_memory
from riffusion.latents import (
    LATENT_CHANNELS,
    CacheStats,
    LRUCache,
    keep_mask_from_image,
    lerp,
    model_output_to_pixels,
    pixels_to_model_input,
    seeded_noise,
    slerp,
)
from riffusion.models import DEFAULT_MODEL_ID, RiffusionComponents, load_components
from riffusion.prompts import PromptEncoder
from riffusion.schedulers import JobSchedule, make_scheduler, schedule_job, scheduler_step
from riffusion.schemas import (
    HEIGHT,
    MAX_WIDTH,
    MIN_WIDTH,
    WIDTH_MULTIPLE,
    GenerationJob,
    PromptInput,
    lerp_float,
)
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import (
    INT16_FULL_SCALE,
    SpectrogramParams,
    get_converter,
    image_from_pixels,
    mel_amplitudes_from_pixels,
)
from riffusion.unet_backends import UNetBackend, backend_in_use, prepare_unet

logger = logging.getLogger(__name__)

# Called after every UNet forward with (job-steps done, job-steps in total).
ProgressCallback = Callable[[int, int], None]
SEED_LATENT_CACHE_SIZE = 64


@dataclass
class GeneratedClip:
    """One job's output."""

    image: PIL.Image.Image  # spectrogram as decoded by the VAE, with EXIF
    audio: Audio  # normalised loudness
    timings: dict[str, float]  # seconds: encode/denoise/denoise_per_step/decode/griffin_lim/total
    latents: Tensor  # (1, 4, h, w) float32 on the CPU: final latents before the VAE decode
    steps: int = 0  # denoising steps it ran
    batch_size: int = 1  # most jobs that shared one of its UNet forwards


@dataclass
class JobState:
    """Everything one job carries through the denoising loop."""

    index: int
    job: GenerationJob
    text_embeddings: Tensor  # (2, T, D): [unconditional, conditional]
    guidance: float
    schedule: JobSchedule
    noise: Tensor  # (1, 4, h, w) float32
    init_latents: Tensor | None  # (1, 4, h, w) float32, the VAE-encoded seed image
    keep_mask: Tensor | None  # (1, 1, h, w) float32, 1 = keep the seed image
    latents: Tensor  # (1, 4, h, w) float32, updated in the loop
    step_generator: torch.Generator  # for schedulers that draw noise while stepping
    steps_done: int = 0
    peak_batch_size: int = 1  # most jobs that shared one of its UNet forwards
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return int(self.latents.shape[-2]), int(self.latents.shape[-1])

    @property
    def num_steps(self) -> int:
        return len(self.schedule.timestep_values)  # a list's length: read at every step

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.num_steps

    @property
    def timestep(self) -> Tensor:
        return self.schedule.timesteps[self.steps_done]


@dataclass(frozen=True)
class _BatchConstants:
    """A batch's inputs that stay the same from step to step (``_batch_constants``)."""

    embeddings: tuple[Tensor, ...]  # each job's own (2, T, D), compared by identity
    guidance_values: tuple[float, ...]
    text_embeddings: Tensor  # (2B, T, D) in the model's dtype: unconditional half, then conditional
    guidance: Tensor  # (B, 1, 1, 1) float32 guidance scales on the device


@dataclass
class _ValidatedImages:
    """A job's seed and mask images, loaded and checked during validation."""

    seed_image: PIL.Image.Image | None
    seed_key: str | None  # cache key: library id or PNG hash
    mask_image: PIL.Image.Image | None


class RiffusionPipeline:
    """Riffusion's diffusion pipeline, batched over heterogeneous jobs."""

    def __init__(
        self,
        components: RiffusionComponents,
        unet_backend: UNetBackend = "eager",
        seed_images: SeedImageLibrary | None = None,
        spectrogram_params: SpectrogramParams | None = None,
        seed_latent_cache_size: int = SEED_LATENT_CACHE_SIZE,
        batched_scheduler_steps: bool = True,
    ) -> None:
        self.components = components
        # Jobs sharing a scheduler kind stepped at once (off: each alone, as a reference).
        self.batched_scheduler_steps = batched_scheduler_steps
        self.device = components.device
        self.dtype = components.dtype
        self.unet_forward = prepare_unet(components, unet_backend)
        self.unet_backend_requested = unet_backend
        # What runs: a traced backend without a usable trace fell back to eager.
        self.unet_backend = backend_in_use(self.unet_forward)
        self.prompt_encoder = PromptEncoder(components.tokenizer, components.text_encoder)
        self.seed_images = seed_images if seed_images is not None else SeedImageLibrary()
        self.spectrogram_params = spectrogram_params or SpectrogramParams()
        self.seed_latent_cache: LRUCache[tuple[str, int], Tensor] = LRUCache(seed_latent_cache_size)
        self._last_batch: _BatchConstants | None = None  # the last step's batch's inputs
        vae = components.vae
        # On a CPU oneDNN convolves channels-last tensors without reordering them to and
        # from its blocked layout: a 2048 px decode takes ~30 % less time and ~50 MB less
        # memory (docs/benchmarks.md, "Hardening: memory per request").
        self.policy = device_policy(self.device)
        self.vae_memory_format = (
            torch.channels_last if self.policy.vae_channels_last else torch.contiguous_format
        )
        vae.to(memory_format=self.vae_memory_format)  # type: ignore[call-arg]
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.vae_scaling = float(vae.config["scaling_factor"])

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL_ID,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        unet_backend: UNetBackend = "eager",
        seed_images: SeedImageLibrary | None = None,
        spectrogram_params: SpectrogramParams | None = None,
    ) -> RiffusionPipeline:
        """Load ``model`` (hub id, local diffusers directory or ``tiny``) and build the pipeline."""
        components = load_components(model, device=device, dtype=dtype)
        return cls(components, unet_backend, seed_images, spectrogram_params)

    def warm_up(self) -> float:
        """Generate one cheap clip (one step, the default width) and return its seconds.

        A process's first generation pays one-off costs (kernels and caches set up for
        the common shapes, FFT plans, on a GPU the CUDA context): with the tiny model
        on a CPU its first request raised the model worker's RSS by 145-170 MB, later
        ones by 55-80 MB (docs/benchmarks.md). A server warms up before it reports
        ready, so no request pays them.
        """
        began = time.perf_counter()
        self.run([GenerationJob(start=PromptInput(prompt="warm-up"), num_inference_steps=1)])
        return time.perf_counter() - began

    def describe(self) -> dict[str, Any]:
        """Model id, tiny or not, device, dtype and UNet backend, for logs and health checks."""
        return {
            **self.components.describe(),
            "unet_backend": self.unet_backend,
            "unet_backend_requested": self.unet_backend_requested,
            "griffin_lim_iters": self.spectrogram_params.num_griffin_lim_iters,
        }

    def cache_stats(self) -> dict[str, CacheStats]:
        """Snapshot of the hit/miss counters of the text-embedding and seed-latent caches."""
        text = self.prompt_encoder.cache_info()
        seeds = self.seed_latent_cache.stats
        return {
            "text_embeddings": CacheStats(hits=text.hits, misses=text.misses),
            "seed_latents": CacheStats(hits=seeds.hits, misses=seeds.misses),
        }

    # --- 1. validation ---------------------------------------------------------------------------

    def validate(self, jobs: Sequence[GenerationJob]) -> list[_ValidatedImages]:
        """Load and check every job's images; raises before any model compute.

        Unknown seed/mask ids raise the seed-image library's error; a bad init
        image raises ``InvalidJobError``.
        """
        return [self._validate_job(index, job) for index, job in enumerate(jobs)]

    def _validate_job(self, index: int, job: GenerationJob) -> _ValidatedImages:
        seed_image: PIL.Image.Image | None = None
        seed_key: str | None = None
        if job.seed_image_id is not None:
            self.seed_images.info(job.seed_image_id, kind="seed")
            seed_image = self.seed_images.load(job.seed_image_id, kind="seed")
            seed_key = f"id:{job.seed_image_id}"
        elif job.init_image_png is not None:
            seed_image = _decode_png(index, job.init_image_png)
            seed_key = "png:" + hashlib.sha256(job.init_image_png).hexdigest()
        if seed_image is not None:
            _check_spectrogram_size(index, seed_image)
        mask_image: PIL.Image.Image | None = None
        if job.mask_image_id is not None:
            self.seed_images.info(job.mask_image_id, kind="mask")
            mask_image = self.seed_images.load(job.mask_image_id, kind="mask")
        return _ValidatedImages(seed_image, seed_key, mask_image)

    # --- 2. per-job preparation ------------------------------------------------------------------

    def prepare(
        self, job: GenerationJob, index: int = 0, images: _ValidatedImages | None = None
    ) -> JobState:
        """Embeddings, noise, init latents, mask and scheduler for one job (no denoising)."""
        began = time.perf_counter()
        if images is None:
            images = self._validate_job(index, job)
        start, end = job.start, job.end_or_start
        alpha = job.effective_alpha  # 0 without an end input

        text_embeddings = self._text_embeddings(job, alpha)  # (2, T, D)
        guidance = lerp_float(start.guidance, end.guidance, alpha)

        seed_width = images.seed_image.width if images.seed_image is not None else None
        latent_shape = (1, LATENT_CHANNELS, *job.latent_size(self.vae_scale_factor, seed_width))
        noise = slerp(
            seeded_noise(start.seed, latent_shape), seeded_noise(end.seed, latent_shape), alpha
        )
        noise = noise.to(self.device)

        scheduler = make_scheduler(job.scheduler, self.components.scheduler_config)
        init_latents: Tensor | None = None
        keep_mask: Tensor | None = None
        if images.seed_image is not None and images.seed_key is not None:
            schedule = schedule_job(scheduler, job.num_inference_steps, job.img2img_denoising)
            init_latents = self._seed_latents(images.seed_key, images.seed_image, start.seed)
            if schedule.num_steps > 0:
                latents = schedule.add_noise(init_latents, noise, schedule.timesteps[0])
            else:
                latents = init_latents.clone()
            if images.mask_image is not None:
                keep_mask = keep_mask_from_image(
                    images.mask_image, latent_shape[-2], latent_shape[-1]
                ).to(self.device)
        else:
            schedule = schedule_job(scheduler, job.num_inference_steps, None)
            latents = noise * schedule.scheduler.init_noise_sigma

        return JobState(
            index=index,
            job=job,
            text_embeddings=text_embeddings,
            guidance=guidance,
            schedule=schedule,
            noise=noise,
            init_latents=init_latents,
            keep_mask=keep_mask,
            latents=latents,
            step_generator=torch.Generator("cpu").manual_seed(start.seed),
            timings={"encode": time.perf_counter() - began},
        )

    def _text_embeddings(self, job: GenerationJob, alpha: float) -> Tensor:
        """(2, T, D) float32: [lerped negative embedding, lerped prompt embedding].

        All four texts of a job are embedded with the same number of CLIP
        windows (the most any of them needs), so they can be lerped and stacked.
        """
        start, end = job.start, job.end_or_start
        texts = [start.prompt, end.prompt, start.negative_prompt or "", end.negative_prompt or ""]
        windows = max(self.prompt_encoder.windows_needed(text) for text in texts)
        encoded = [self.prompt_encoder.encode(text, num_windows=windows) for text in texts]
        start_cond, end_cond, start_uncond, end_uncond = (e.float() for e in encoded)
        cond = lerp(start_cond, end_cond, alpha)
        uncond = lerp(start_uncond, end_uncond, alpha)
        return torch.cat([uncond, cond])

    def _seed_latents(self, key: str, image: PIL.Image.Image, seed: int) -> Tensor:
        """(1, 4, h, w) float32 VAE latents of a seed image, sampled with ``seed`` (cached)."""

        def encode() -> Tensor:
            vae = self.components.vae
            pixels = pixels_to_model_input(image).to(self.device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            # The sample's noise is drawn in float32 whatever the model's dtype: a CPU
            # generator draws other numbers in half precision than in float32 (for
            # tensors of 16 or more elements), so ``latent_dist.sample`` would give a
            # float16 deployment other seed latents than the float32 reference.
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
            mean, std = posterior.mean.float(), posterior.std.float()
            return (mean + std * noise.to(self.device)) * self.vae_scaling

        return self.seed_latent_cache.get_or_compute((key, seed), encode)

    # --- 3. batched denoising --------------------------------------------------------------------

    def denoise(self, states: Sequence[JobState], progress: ProgressCallback | None = None) -> None:
        """Step every job to its end: the engine's step (``step_groups``) without its queue.

        All jobs start together; at each step every unfinished job runs once, jobs of one
        ``step_key`` in one UNet forward; jobs with fewer steps drop out early.
        """
        began = time.perf_counter()
        total = sum(state.num_steps for state in states)
        done = 0
        running = list(states)
        while True:
            for state in running:
                if state.finished:
                    state.timings["denoise"] = time.perf_counter() - began
            if not (running := [state for state in running if not state.finished]):
                return
            for batch in step_groups(running):
                self.denoise_step(batch)
                done += len(batch)
                if progress is not None:
                    progress(done, total)

    def denoise_step(self, batch: Sequence[JobState]) -> None:
        """One UNet forward for ``batch`` (B jobs, 2B samples), then every job's scheduler step.

        The jobs must share a latent shape and a text length (``step_key``). Jobs whose
        schedulers share a ``BatchedStepper`` (riffusion/batched_step.py) are stepped
        together: guidance, the scheduler's update and the mask blend run once on
        (n, 4, h, w) with per-sample coefficients, each job at its own step of its own
        scheduler; a job's latents are bit-identical to stepping it alone. The others
        (and every job when ``batched_scheduler_steps`` is off) go through
        ``_step_alone``. What the jobs feed every step unchanged (the batch's text
        embeddings, its guidance scales) is built when the batch's jobs change, not at
        every step (``_batch_constants``).
        """
        groups = self._stepping_groups(batch)
        constants = self._batch_constants(batch)
        latents = stacked([s.latents for s in batch])  # (B, 4, h, w); read, never written
        latent_model_input = self._scale_model_input(batch, groups, latents)  # (B, 4, h, w)
        latent_model_input = torch.cat([latent_model_input, latent_model_input])  # (2B, 4, h, w)
        values = [s.schedule.timestep_values[s.steps_done] for s in batch] * 2
        timesteps = constant(values, (-1,), torch.float32, self.device)  # (2B,); never written

        noise_pred = as_dtype(
            self.unet_forward(
                as_dtype(latent_model_input, self.dtype), timesteps, constants.text_embeddings
            ),
            torch.float32,
        )  # (2B, 4, h, w)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # (B, 4, h, w) each

        for stepper, rows in groups.items():
            if stepper is None:
                for row in rows:
                    self._step_alone(
                        batch[row], noise_pred_uncond[row : row + 1], noise_pred_text[row : row + 1]
                    )
            else:
                predictions = (rows_of(noise_pred_uncond, rows), rows_of(noise_pred_text, rows))
                states = [batch[row] for row in rows]
                guidance = rows_of(constants.guidance, rows)
                self._step_together(stepper, states, predictions, rows_of(latents, rows), guidance)
        for state in batch:
            state.peak_batch_size = max(state.peak_batch_size, len(batch))

    def _batch_constants(self, batch: Sequence[JobState]) -> _BatchConstants:
        """What ``batch`` feeds every step unchanged, built when the batch changes: the
        engine's batch stays the same for most steps, so a step rebuilds nothing."""
        embeddings = tuple(s.text_embeddings for s in batch)
        guidance = tuple(s.guidance for s in batch)
        cached = self._last_batch
        if (
            cached is not None
            and len(cached.embeddings) == len(embeddings)
            and all(a is b for a, b in zip(cached.embeddings, embeddings, strict=True))
            and cached.guidance_values == guidance
        ):
            return cached
        text_embeddings = torch.cat(
            [
                torch.stack([e[0] for e in embeddings]),
                torch.stack([e[1] for e in embeddings]),
            ]
        ).to(self.dtype)  # (2B, T, D): unconditional half, then conditional half
        self._last_batch = _BatchConstants(
            embeddings=embeddings,
            guidance_values=guidance,
            text_embeddings=text_embeddings,
            guidance=constant(guidance, (-1, 1, 1, 1), torch.float32, self.device),
        )
        return self._last_batch

    def _stepping_groups(self, batch: Sequence[JobState]) -> dict[BatchedStepper | None, list[int]]:
        """Rows of ``batch`` by the stepper that steps them (None: stepped alone)."""
        if not self.batched_scheduler_steps:
            return {None: list(range(len(batch)))}
        return group_by(range(len(batch)), lambda row: batch[row].schedule.stepper)

    def _scale_model_input(
        self,
        batch: Sequence[JobState],
        groups: dict[BatchedStepper | None, list[int]],
        latents: Tensor,
    ) -> Tensor:
        """(B, 4, h, w) latents -> the UNet's input: each job's ``scale_model_input``."""
        scaled = latents
        for stepper, rows in groups.items():
            if stepper is not None and not stepper.scales_model_input:
                continue
            if scaled is latents:
                scaled = latents.clone()
            if stepper is None:
                for row in rows:
                    state = batch[row]
                    scaled[row : row + 1] = state.schedule.scheduler.scale_model_input(
                        latents[row : row + 1], state.timestep
                    )
            else:
                jobs = [step_job(batch[row]) for row in rows]
                scaled[rows] = stepper.scale_model_input(jobs, rows_of(latents, rows))
        return scaled

    def _step_together(
        self,
        stepper: BatchedStepper,
        states: Sequence[JobState],
        predictions: tuple[Tensor, Tensor],
        latents: Tensor,
        guidance: Tensor,
    ) -> None:
        """Guidance, scheduler step and mask blend of ``states`` at once ((n, 4, h, w) inputs,
        (n, 1, 1, 1) guidance scales).

        Nothing of a job changes until every tensor is computed, so a failure leaves
        the jobs as they were (the engine then retries each alone).
        """
        jobs = [step_job(state) for state in states]
        # A failed step must not have drawn from a job's generator either.
        generator_states = (
            [s.step_generator.get_state() for s in states] if stepper.draws_noise else []
        )
        try:
            stepped, advance = self._step_tensors(
                stepper, jobs, states, *predictions, latents, guidance
            )
        except BaseException:
            for state, generator_state in zip(states, generator_states, strict=False):
                state.step_generator.set_state(generator_state)
            raise
        advance()
        for state, state_latents in zip(states, row_views(stepped), strict=True):
            state.steps_done += 1
            # A row of the group's tensor; a finished job's own copy, not the whole group's.
            state.latents = state_latents.clone() if state.finished else state_latents

    def _step_tensors(
        self,
        stepper: BatchedStepper,
        jobs: list[StepJob],
        states: Sequence[JobState],
        noise_pred_uncond: Tensor,
        noise_pred_text: Tensor,
        latents: Tensor,
        guidance: Tensor,
    ) -> tuple[Tensor, Callable[[], None]]:
        """``_step_together``'s arithmetic: (n, 4, h, w) next latents, and ``advance``."""
        # uncond + guidance * (text - uncond), in place on the fresh difference (same ops).
        guided = (noise_pred_text - noise_pred_uncond).mul_(guidance).add_(noise_pred_uncond)
        stepped, advance = stepper.step(jobs, guided, latents)  # (n, 4, h, w)

        masked = [
            row
            for row, state in enumerate(states)
            if state.keep_mask is not None and state.init_latents is not None
        ]
        if masked:
            # The kept region follows the seed image, noised to the step's timestep.
            kept = stepper.add_noise(
                [jobs[row] for row in masked],
                torch.cat([states[row].init_latents for row in masked]),  # type: ignore[misc]
                torch.cat([states[row].noise for row in masked]),
            )
            keep_mask = torch.cat([states[row].keep_mask for row in masked])  # type: ignore[misc]
            blended = kept * keep_mask + rows_of(stepped, masked) * (1 - keep_mask)
            if len(masked) == len(states):
                stepped = blended
            else:
                stepped = stepped.clone()
                stepped[masked] = blended
        return stepped, advance

    def _step_alone(self, state: JobState, uncond: Tensor, text: Tensor) -> None:
        """The per-job step, for schedulers without a stepper: guidance, ``scheduler.step``
        with the job's generator, mask blend ((1, 4, h, w) noise predictions)."""
        guided = uncond + state.guidance * (text - uncond)
        timestep = state.timestep
        state.latents = scheduler_step(
            state.schedule.scheduler, guided, timestep, state.latents, state.step_generator
        )
        if state.keep_mask is not None and state.init_latents is not None:
            # The kept region follows the seed image, noised to the step's timestep.
            kept = state.schedule.add_noise(state.init_latents, state.noise, timestep)
            state.latents = kept * state.keep_mask + state.latents * (1 - state.keep_mask)
        state.steps_done += 1

    # --- 4. decoding -----------------------------------------------------------------------------

    def decode_pixels(self, latents: Tensor) -> Tensor:
        """(B, 4, h, w) latents -> uint8 (B, 3, H, W) spectrogram pixels, one VAE call."""
        vae = self.components.vae
        latents = latents.to(self.device, vae.dtype) / self.vae_scaling
        decoded = vae.decode(latents.contiguous(memory_format=self.vae_memory_format)).sample
        if not bool(torch.isfinite(decoded).all()):
            # fp16 activations overflow above 65504; uint8 pixels would hide it as noise.
            raise FloatingPointError(
                f"the VAE decode gave non-finite values in {decoded.dtype}; "
                "load the model in float32 or bfloat16"
            )
        return model_output_to_pixels(decoded)

    def griffin_lim(
        self, pixels: Tensor, generators: Sequence[torch.Generator]
    ) -> list[np.ndarray]:
        """uint8 (B, 3, H, W) pixels -> B waveforms (channels, samples), one Griffin-Lim call."""
        params = self.spectrogram_params
        amplitudes = mel_amplitudes_from_pixels(pixels, params)  # (B, C, H, W)
        converter = get_converter(params, self.device)
        waveforms = converter.waveform_from_mel_amplitudes(
            amplitudes.to(self.device), generator=list(generators)
        )  # (B, C, samples)
        return [(w / INT16_FULL_SCALE).cpu().numpy().astype(np.float32) for w in waveforms]

    # --- 5. the whole run ------------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self, jobs: Sequence[GenerationJob], progress: ProgressCallback | None = None
    ) -> list[GeneratedClip]:
        """Generate one clip per job, in job order; a job's output ignores its batch-mates."""
        began = time.perf_counter()
        images = self.validate(jobs)
        states = [
            self.prepare(job, index, job_images)
            for index, (job, job_images) in enumerate(zip(jobs, images, strict=True))
        ]
        self.denoise(states, progress)

        clips: dict[int, GeneratedClip] = {}
        for group in group_by(states, lambda state: state.latent_shape).values():
            for state, clip in zip(group, self.finish(group), strict=True):
                clip.timings["total"] = time.perf_counter() - began
                clips[state.index] = clip
        return [clips[index] for index in range(len(jobs))]

    def finish(self, group: Sequence[JobState]) -> list[GeneratedClip]:
        """Decode finished jobs of one latent shape and turn them into audio.

        On a GPU the group goes through one VAE call and one batched Griffin-Lim. On a
        CPU its clips go one at a time, and the freed heap goes back to the OS before
        each stage and after each clip: a batch's VAE activations and Griffin-Lim
        buffers at once grew the worker by hundreds of MB per batch, and what one
        stage freed stayed resident under the next one's peak (docs/benchmarks.md,
        "Hardening: memory per request"). Batching them saves no CPU time (Griffin-Lim
        already runs item by item there). Timings cover the job's own stages; the
        caller adds ``total`` (it knows when the job began).
        """
        if self.policy.batch_together:
            return self._finish_together(group)
        clips: list[GeneratedClip] = []
        for state in group:
            clips += self._finish_together([state], trim_heap=True)
        release_freed_memory()  # what the last clip freed (the next clip's decode trims first)
        return clips

    def _finish_together(
        self, group: Sequence[JobState], *, trim_heap: bool = False
    ) -> list[GeneratedClip]:
        """``finish`` for ``group`` in one VAE call and one Griffin-Lim call."""
        params = self.spectrogram_params
        latents = torch.cat([state.latents for state in group])  # (B, 4, h, w)
        if trim_heap:
            release_freed_memory()
        decode_began = time.perf_counter()
        pixels = self.decode_pixels(latents)  # (B, 3, H, W) uint8
        decode_s = time.perf_counter() - decode_began
        if trim_heap:
            release_freed_memory()

        griffin_lim_began = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(s.job.start.seed) for s in group]
        waveforms = self.griffin_lim(pixels, generators)
        griffin_lim_s = time.perf_counter() - griffin_lim_began

        amplitudes_max = mel_amplitudes_from_pixels(pixels.cpu(), params).amax(dim=(1, 2, 3))
        clips = []
        for row, state in enumerate(group):
            audio = normalize_loudness(Audio(waveforms[row], params.sample_rate))
            timings = dict(state.timings)
            steps = max(state.num_steps, 1)
            timings.update(
                denoise_per_step=timings.get("denoise", 0.0) / steps,
                decode=decode_s,
                griffin_lim=griffin_lim_s,
            )
            clips.append(
                GeneratedClip(
                    image=image_from_pixels(pixels[row], params, float(amplitudes_max[row])),
                    audio=audio,
                    timings=timings,
                    latents=state.latents.detach().cpu(),
                    steps=state.num_steps,
                    batch_size=state.peak_batch_size,
                )
            )
        return clips


def step_job(state: JobState) -> StepJob:
    """What a ``BatchedStepper`` needs of ``state`` for its next step."""
    schedule = state.schedule
    return StepJob(
        scheduler=schedule.scheduler,
        noiser=schedule.noiser,
        timesteps=schedule.timesteps,
        step=state.steps_done,
        timestep_value=schedule.timestep_values[state.steps_done],
        generator=state.step_generator,
    )


def as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, without a call when it has that dtype already (fp32 runs)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def rows_of(tensor: Tensor, rows: list[int]) -> Tensor:
    """``tensor[rows]`` for ascending, distinct ``rows``; without a copy when that is every row."""
    if len(rows) == tensor.shape[0]:  # ascending and distinct: 0, 1, ..., n - 1
        return tensor
    return tensor[rows]


def step_key(state: JobState) -> tuple[int, int, int]:
    """Jobs with equal keys can share a UNet forward: latent height, width and text length."""
    return (*state.latent_shape, int(state.text_embeddings.shape[1]))


def step_groups(running: Sequence[JobState]) -> list[list[JobState]]:
    """One step of the running jobs, as the batches that share a UNet forward."""
    return list(group_by(running, step_key).values())


def group_by(items: Sequence[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    """Items grouped by ``key``, groups and members in first-seen order."""
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _decode_png(index: int, data: bytes) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise InvalidJobError(
            f"job {index}: init_image_png is not a readable image: {error}"
        ) from error
    return image


def _check_spectrogram_size(index: int, image: PIL.Image.Image) -> None:
    if image.height != HEIGHT:
        raise InvalidJobError(
            f"job {index}: seed image is {image.height} px high; spectrogram images are "
            f"{HEIGHT} px high (one row per mel bin)"
        )
    if image.width % WIDTH_MULTIPLE or not MIN_WIDTH <= image.width <= MAX_WIDTH:
        raise InvalidJobError(
            f"job {index}: seed image is {image.width} px wide; the width must be a multiple of "
            f"{WIDTH_MULTIPLE} between {MIN_WIDTH} and {MAX_WIDTH}"
        )
