"""CPU benchmark: one 512-px spectrogram image to audio, the project's path vs the plain recipe.

Plain recipe: torchaudio ``InverseMelScale`` (a least-squares solve every call)
then ``GriffinLim`` (32 iterations, momentum 0.99, random init from the global
RNG). Project: ``riffusion.spectrogram.audio_from_image`` (cached converter
with a precomputed inverse mel; the same Griffin-Lim iteration, run at the
lowest sample rate that holds the mel band, with cheaper steps; initial phase
from a generator). Both run on the same synthesised image
(a chord plus clicks), alternating within one process so CPU contention hits
both alike, with the same seeds, so both start from the same initial phase.

Spectral convergence (SC) is ``||M - mel(|STFT(x)|)||_F / ||M||_F`` against
the mel amplitudes M decoded from the image (the target both paths share); the
linear-magnitude SC against torchaudio's inverse-mel output is printed too.

Exits 1 unless the project is at least ``--target`` times faster (median wall
time) at equal or better mean mel SC (equal: within ``--sc-tolerance``
relative, for float32 rounding).

    uv run --frozen --all-extras python bench/bench_image_to_audio.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torchaudio.transforms as T
from PIL import Image

from riffusion.audio import Audio
from riffusion.spectrogram import (
    INT16_FULL_SCALE,
    SpectrogramConverter,
    SpectrogramParams,
    audio_from_image,
    get_converter,
    image_from_audio,
    mel_amplitudes_from_image,
    spectral_convergence,
)

IMAGE_WIDTH = 512


def synthesised_image(params: SpectrogramParams, width_px: int = IMAGE_WIDTH) -> Image.Image:
    """A mono spectrogram ``width_px`` wide of an A-minor-seventh chord plus clicks at 120 bpm."""
    num_samples = (width_px - 1) * params.hop_length
    t = np.arange(num_samples) / params.sample_rate
    chord = sum(0.15 * np.sin(2 * np.pi * freq * t) for freq in (220.0, 261.63, 329.63, 392.0))
    clicks = np.zeros(num_samples)
    clicks[:: params.sample_rate // 2] = 1.0
    clicks = np.convolve(clicks, np.exp(-np.arange(400) / 40.0))[:num_samples]
    samples = (chord + 0.8 * clicks).astype(np.float32)[None]
    image = image_from_audio(Audio(samples, params.sample_rate), params, device="cpu")
    assert image.size == (width_px, params.num_frequencies), image.size
    return image


def plain_recipe(image: Image.Image, seed: int) -> torch.Tensor:
    """Image -> waveform the plain torchaudio way: solve the inverse mel, then GriffinLim."""
    amplitudes, params = mel_amplitudes_from_image(image)
    inverse_mel = T.InverseMelScale(
        n_stft=params.n_fft // 2 + 1,
        n_mels=params.num_frequencies,
        sample_rate=params.sample_rate,
        f_min=float(params.min_frequency),
        f_max=float(params.max_frequency),
        norm=None,
        mel_scale="htk",
    )
    griffin_lim = T.GriffinLim(
        n_fft=params.n_fft,
        n_iter=params.num_griffin_lim_iters,
        win_length=params.win_length,
        hop_length=params.hop_length,
        power=1.0,
        momentum=params.griffin_lim_momentum,
        length=(amplitudes.shape[-1] - 1) * params.hop_length,
        rand_init=True,
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        return griffin_lim(inverse_mel(amplitudes))


def project_path(image: Image.Image, seed: int) -> torch.Tensor:
    audio = audio_from_image(image, device="cpu", generator=torch.Generator().manual_seed(seed))
    # Back to the decode scale, to measure against the same target as the plain recipe.
    return torch.from_numpy(audio.samples) * INT16_FULL_SCALE


@dataclass
class PathResult:
    name: str
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    mel_sc: list[float] = field(default_factory=list)
    linear_sc: list[float] = field(default_factory=list)


def measure(
    result: PathResult,
    run: Callable[[Image.Image, int], torch.Tensor],
    image: Image.Image,
    seed: int,
    converter: SpectrogramConverter,
    mel_target: torch.Tensor,
    linear_target: torch.Tensor,
) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    waveform = run(image, seed)
    result.wall_s.append(time.perf_counter() - wall)
    result.cpu_s.append(time.process_time() - cpu)
    with torch.inference_mode():
        linear = converter.spectrogram(waveform)
    result.mel_sc.append(spectral_convergence(mel_target, converter.mel_scale(linear)))
    result.linear_sc.append(spectral_convergence(linear_target, linear))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="seeds per path (seed 0, 1, ...)")
    parser.add_argument("--target", type=float, default=2.0, help="required speed ratio")
    parser.add_argument("--sc-tolerance", type=float, default=0.005, help="relative SC slack")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    params = SpectrogramParams()
    build = time.perf_counter()
    converter = get_converter(params, "cpu")  # once per process; later calls reuse it
    build_s = time.perf_counter() - build
    image = synthesised_image(params)
    mel_target, _ = mel_amplitudes_from_image(image)
    with torch.inference_mode():
        linear_target = T.InverseMelScale(
            n_stft=params.n_fft // 2 + 1, n_mels=params.num_frequencies,
            sample_rate=params.sample_rate, f_min=float(params.min_frequency),
            f_max=float(params.max_frequency), norm=None, mel_scale="htk",
        )(mel_target)  # fmt: skip

    plain, project = PathResult("plain torchaudio"), PathResult("project")
    print(
        f"image {image.width}x{image.height} px, {params.num_griffin_lim_iters} Griffin-Lim "
        f"iterations, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; converter built once in {build_s:.2f} s",
        flush=True,
    )
    for seed in range(args.rounds):
        for result, run in ((plain, plain_recipe), (project, project_path)):
            measure(result, run, image, seed, converter, mel_target, linear_target)
            print(
                f"  seed {seed} {result.name:>16}: {result.wall_s[-1]:6.2f} s wall "
                f"{result.cpu_s[-1]:6.2f} s CPU  mel SC {result.mel_sc[-1]:.4f}  "
                f"linear SC {result.linear_sc[-1]:.4f}",
                flush=True,
            )

    print(f"\n{'path':>16} | median wall s | median CPU s | mean mel SC | mean linear SC")
    for result in (plain, project):
        print(
            f"{result.name:>16} | {statistics.median(result.wall_s):13.2f} | "
            f"{statistics.median(result.cpu_s):12.2f} | {statistics.mean(result.mel_sc):11.4f} | "
            f"{statistics.mean(result.linear_sc):14.4f}"
        )
    wall_ratio = statistics.median(plain.wall_s) / statistics.median(project.wall_s)
    cpu_ratio = statistics.median(plain.cpu_s) / statistics.median(project.cpu_s)
    plain_sc, project_sc = statistics.mean(plain.mel_sc), statistics.mean(project.mel_sc)
    sc_ok = project_sc <= plain_sc * (1 + args.sc_tolerance)
    speed_ok = wall_ratio >= args.target
    print(
        f"\nspeed ratio (plain / project): {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
        f"(target {args.target:.1f}x wall)"
    )
    print(
        f"mel SC: project {project_sc:.4f} vs plain {plain_sc:.4f} "
        f"({'equal or better' if sc_ok else 'WORSE'}; tolerance {args.sc_tolerance:.1%})"
    )
    passed = speed_ok and sc_ok
    print("PASS" if passed else "FAIL: target missed")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
