"""Subcommands that run the diffusion model: text-to-audio, riff and interpolate.

Each checks its inputs first (files readable, seed/mask ids known, the model there to
load) and only then imports torch and diffusers and loads the model, so a mistake is
reported in one line at once rather than after 20-40 s (tests/test_cli_startup.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from riffusion.audio import Audio, AudioError, format_for_path, read_audio, write_audio
from riffusion.cli.console import progress_bar, stderr
from riffusion.cli.errors import friendly_errors
from riffusion.cli.hub import prepare_hub_model
from riffusion.model_source import DEFAULT_MODEL_ID, MODEL_ENV_VAR, ModelLoadError
from riffusion.riff import (
    CLIP_DURATION_S,
    OVERLAP_S,
    RIFF_DENOISING,
    RiffPlan,
    interpolation_jobs,
    slice_riff,
    stitch_clips,
    with_init_image,  # imports torch when it runs: after the checks
)
from riffusion.schemas import GenerationJob, PromptInput, SchedulerName, width_for_duration
from riffusion.seed_images import SeedImageLibrary

if TYPE_CHECKING:  # torch and diffusers: imported once the inputs are checked
    from riffusion.pipeline import GeneratedClip, RiffusionPipeline

UNET_BACKENDS = ("eager", "traced", "compiled")
SEED_RANGE = click.IntRange(0, 2**32 - 1)
# The spectrogram format's Griffin-Lim iterations (SpectrogramParams; a test keeps them equal).
GRIFFIN_LIM_ITERS = 32
# Errors that come from the user's input or setup: reported as one line, exit code 1.
# Audio, seed-image, spectrogram and invalid-job errors are all ValueErrors.
USER_ERRORS = (AudioError, ModelLoadError, ValueError)


@dataclass(frozen=True)
class ModelSettings:
    """The options every generation command shares, given to it as ``settings``."""

    model: str
    device: str | None
    unet_backend: str
    scheduler: str | None
    steps: int
    griffin_lim_iters: int


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared options to a command; it receives them as ``settings: ModelSettings``."""

    @functools.wraps(command)
    def with_settings(
        *args: Any,
        model: str,
        device: str | None,
        unet_backend: str,
        scheduler: str | None,
        steps: int,
        griffin_lim_iters: int,
        **kwargs: Any,
    ) -> Any:
        settings = ModelSettings(model, device, unet_backend, scheduler, steps, griffin_lim_iters)
        return command(*args, settings=settings, **kwargs)

    decorators = [
        click.option(
            "--model",
            envvar=MODEL_ENV_VAR,
            default=DEFAULT_MODEL_ID,
            show_default=True,
            help="Hub id, local diffusers directory, or 'tiny' (random weights, for offline "
            f"runs); env {MODEL_ENV_VAR}.",
        ),
        click.option("--device", default=None, help="torch device; default CUDA when available."),
        click.option(
            "--unet-backend",
            type=click.Choice(UNET_BACKENDS),
            default="eager",
            show_default=True,
            help="How the UNet runs: eager, TorchScript-traced, or torch.compile.",
        ),
        click.option(
            "--scheduler",
            type=click.Choice([name.value for name in SchedulerName]),
            default=None,
            help="Diffusion scheduler; default the checkpoint's own.",
        ),
        click.option(
            "--steps",
            type=click.IntRange(1, 150),
            default=50,
            show_default=True,
            help="Denoising steps.",
        ),
        click.option(
            "--griffin-lim-iters",
            type=click.IntRange(1, 1000),
            default=GRIFFIN_LIM_ITERS,
            show_default=True,
            help="Griffin-Lim phase reconstruction iterations (fewer is faster, rougher).",
        ),
    ]
    decorated: Callable[..., Any] = with_settings
    for decorator in reversed(decorators):
        decorated = decorator(decorated)
    return decorated


def check_model(settings: ModelSettings) -> None:
    """Fail at once on a model that cannot be loaded (before torch is imported)."""
    note = prepare_hub_model(settings.model)
    if note is not None:
        stderr.print(note)


def load_pipeline(settings: ModelSettings) -> RiffusionPipeline:
    """Import torch and diffusers and load the model (after ``check_model``)."""
    with stderr.status(f"loading model {settings.model} ..."):
        from riffusion.pipeline import RiffusionPipeline
        from riffusion.spectrogram import SpectrogramParams

        pipeline = RiffusionPipeline.load(
            settings.model,
            device=settings.device,
            unet_backend=settings.unet_backend,  # type: ignore[arg-type]
            spectrogram_params=SpectrogramParams(num_griffin_lim_iters=settings.griffin_lim_iters),
        )
    described = pipeline.describe()
    tiny = " [bold yellow](TINY test model: output is noise)[/]" if described["is_tiny"] else ""
    stderr.print(
        f"model {described['model_id']} on {described['device']}/{described['dtype']}, "
        f"UNet {described['unet_backend']}{tiny}"
    )
    return pipeline


def check_image_ids(seed_image_id: str | None, mask_image_id: str | None) -> None:
    """Fail on unknown seed/mask ids before spending time loading the model."""
    library = SeedImageLibrary()
    if seed_image_id is not None:
        library.info(seed_image_id, kind="seed")
    if mask_image_id is not None:
        library.info(mask_image_id, kind="mask")


@contextmanager
def step_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar fed by the pipeline's (done, total) step callback."""
    with progress_bar(time_remaining=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def run_in_batches(
    pipeline: RiffusionPipeline, jobs: Sequence[GenerationJob], batch_size: int, what: str
) -> list[GeneratedClip]:
    """Run ``jobs`` through the pipeline ``batch_size`` at a time with a progress bar."""
    clips: list[GeneratedClip] = []
    with progress_bar(time_remaining=True) as progress:
        clip_task = progress.add_task(what, total=len(jobs))
        step_task = progress.add_task("denoising steps", total=None)
        for first in range(0, len(jobs), batch_size):
            batch = jobs[first : first + batch_size]
            progress.reset(step_task, total=None)

            def update(done: int, total: int) -> None:
                progress.update(step_task, completed=done, total=total)

            clips.extend(pipeline.run(batch, progress=update))
            progress.advance(clip_task, len(batch))
    return clips


def prompt_input(
    prompt: str, seed: int, negative_prompt: str | None, guidance: float, denoising: float | None
) -> PromptInput:
    fields: dict[str, Any] = {
        "prompt": prompt,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "guidance": guidance,
    }
    if denoising is not None:
        fields["denoising"] = denoising
    return PromptInput(**fields)


def with_scheduler(jobs: list[GenerationJob], scheduler: str | None) -> list[GenerationJob]:
    """``jobs`` with ``--scheduler`` applied (unchanged without one)."""
    if not scheduler:
        return jobs
    return [job.model_copy(update={"scheduler": SchedulerName(scheduler)}) for job in jobs]


def save_image(clip: GeneratedClip, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clip.image.save(path, exif=clip.image.getexif())


def check_output(output: Path) -> None:
    """Fail now, not after the work, on an output suffix no audio format matches."""
    format_for_path(output)


def write_output(audio: Audio, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_audio(audio, output)
    stderr.print(f"wrote {output} ({audio.duration_s:.2f} s)")


guidance_option = click.option(
    "--guidance",
    type=click.FloatRange(0, 30),
    default=7.0,
    show_default=True,
    help="Classifier-free guidance scale.",
)
negative_option = click.option("--negative-prompt", default=None, help="What to steer away from.")
output_option = click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Audio file to write (format from the suffix: wav, flac, ogg, mp3).",
)
overlap_option = click.option(
    "--overlap",
    type=click.FloatRange(0, 5),
    default=OVERLAP_S,
    show_default=True,
    help="Crossfade between clips, seconds.",
)
batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Clips per pipeline call.",
)
mask_image_option = click.option(
    "--mask-image-id", default=None, help="Mask from the seed-image library."
)


@click.command("text-to-audio")
@click.argument("prompt")
@output_option
@click.option("--seed", type=SEED_RANGE, default=0, show_default=True)
@negative_option
@guidance_option
@click.option(
    "--duration",
    type=click.FloatRange(0.64, 20.48),
    default=5.12,
    show_default=True,
    help="Clip length in seconds (rounded to 80 ms).",
)
@click.option(
    "--image",
    "image_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the spectrogram image (PNG with EXIF).",
)
@model_options
@friendly_errors(*USER_ERRORS)
def text_to_audio(
    prompt: str,
    output: Path,
    seed: int,
    negative_prompt: str | None,
    guidance: float,
    duration: float,
    image_path: Path | None,
    settings: ModelSettings,
) -> None:
    """Generate a clip from a text PROMPT (no seed image)."""
    job = GenerationJob(
        start=prompt_input(prompt, seed, negative_prompt, guidance, None),
        num_inference_steps=settings.steps,
        width=width_for_duration(duration),
        scheduler=SchedulerName(settings.scheduler) if settings.scheduler else None,
    )
    check_output(output)
    check_model(settings)
    pipeline = load_pipeline(settings)
    with step_progress("denoising") as update:
        (clip,) = pipeline.run([job], progress=update)
    write_output(clip.audio, output)
    if image_path is not None:
        save_image(clip, image_path)
        stderr.print(f"wrote {image_path}")


@click.command("riff")
@click.argument(
    "input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@output_option
@click.option("--prompt", required=True, help="What the riffed track should sound like.")
@click.option("--end-prompt", default=None, help="Walk from --prompt to this along the track.")
@click.option("--seed", type=SEED_RANGE, default=0, show_default=True)
@click.option(
    "--end-seed",
    type=SEED_RANGE,
    default=None,
    help="Seed of the end prompt (default: --seed).",
)
@negative_option
@guidance_option
@click.option(
    "--denoising",
    type=click.FloatRange(0, 1),
    default=RIFF_DENOISING,
    show_default=True,
    help="How far to move from the source (0.4-0.55 keeps it recognisable).",
)
@click.option(
    "--clip-duration",
    type=click.FloatRange(0.64, 20.48),
    default=CLIP_DURATION_S,
    show_default=True,
    help="Seconds per clip.",
)
@overlap_option
@batch_size_option
@mask_image_option
@model_options
@friendly_errors(*USER_ERRORS)
def riff(
    input_path: Path,
    output: Path,
    prompt: str,
    end_prompt: str | None,
    seed: int,
    end_seed: int | None,
    negative_prompt: str | None,
    guidance: float,
    denoising: float,
    clip_duration: float,
    overlap: float,
    batch_size: int,
    mask_image_id: str | None,
    settings: ModelSettings,
) -> None:
    """Riff on an audio file of any length: overlapping clips re-imagined, then crossfaded."""
    check_output(output)
    audio = read_audio(input_path)
    start = prompt_input(prompt, seed, negative_prompt, guidance, denoising)
    end = (
        prompt_input(
            end_prompt, seed if end_seed is None else end_seed, negative_prompt, guidance, denoising
        )
        if end_prompt is not None
        else None
    )
    sliced = slice_riff(
        audio,
        start,
        end,
        num_inference_steps=settings.steps,
        clip_duration_s=clip_duration,
        overlap_s=overlap,
    )
    num_clips = len(sliced.jobs)
    stderr.print(f"{input_path}: {audio.duration_s:.2f} s -> {num_clips} clips")
    check_image_ids(None, mask_image_id)
    check_model(settings)
    with stderr.status(f"making the spectrograms of {num_clips} clips ..."):
        plan = RiffPlan(
            [
                with_init_image(job, clip, mask_image_id)
                for job, clip in zip(sliced.jobs, sliced.clips, strict=True)
            ],
            sliced.clip_num_frames,
            sliced.clips,
        )
    jobs = with_scheduler(plan.jobs, settings.scheduler)
    pipeline = load_pipeline(settings)
    clips = run_in_batches(pipeline, jobs, batch_size, "clips")
    riffed = stitch_clips([clip.audio for clip in clips], overlap, plan.clip_num_frames)
    write_output(riffed, output)


@click.command("interpolate")
@output_option
@click.option("--start-prompt", required=True)
@click.option("--end-prompt", required=True)
@click.option("--start-seed", type=SEED_RANGE, default=0, show_default=True)
@click.option("--end-seed", type=SEED_RANGE, default=1, show_default=True)
@negative_option
@guidance_option
@click.option("--denoising", type=click.FloatRange(0, 1), default=0.75, show_default=True)
@click.option("--num-clips", type=click.IntRange(2, 64), default=5, show_default=True)
@click.option("--seed-image-id", default="og_beat", show_default=True)
@mask_image_option
@overlap_option
@batch_size_option
@click.option(
    "--images-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write each clip's spectrogram image here (clip_000.png, ...).",
)
@model_options
@friendly_errors(*USER_ERRORS)
def interpolate(
    output: Path,
    start_prompt: str,
    end_prompt: str,
    start_seed: int,
    end_seed: int,
    negative_prompt: str | None,
    guidance: float,
    denoising: float,
    num_clips: int,
    seed_image_id: str,
    mask_image_id: str | None,
    overlap: float,
    batch_size: int,
    images_dir: Path | None,
    settings: ModelSettings,
) -> None:
    """Walk from a start to an end prompt in NUM_CLIPS clips on one seed image, stitched."""
    start = prompt_input(start_prompt, start_seed, negative_prompt, guidance, denoising)
    end = prompt_input(end_prompt, end_seed, negative_prompt, guidance, denoising)
    jobs = interpolation_jobs(start, end, num_clips, seed_image_id, mask_image_id, settings.steps)
    jobs = with_scheduler(jobs, settings.scheduler)
    check_output(output)
    check_image_ids(seed_image_id, mask_image_id)
    check_model(settings)
    pipeline = load_pipeline(settings)
    clips = run_in_batches(pipeline, jobs, batch_size, "clips")
    write_output(stitch_clips([clip.audio for clip in clips], overlap), output)
    if images_dir is not None:
        for index, clip in enumerate(clips):
            save_image(clip, images_dir / f"clip_{index:03d}.png")
        stderr.print(f"wrote {len(clips)} images to {images_dir}")
