"""CPU benchmark: image-to-audio scales linearly, a 30.72 s track against one 5.12 s clip.

``riffusion image-to-audio`` on a long track's spectrogram runs the same Griffin-Lim
(32 iterations) over every column: its time should grow with the width, so a track
of six clips (3072 px, 30.72 s) should cost about six times one clip (512 px).
Both images are synthesised from the same signal (a chord plus clicks) and converted
by ``riffusion.spectrogram.audio_from_image``, alternating within one process so CPU
contention hits both alike, after one untimed warm-up conversion of a narrow image.

Prints ``ratio = time(6 clips) / (6 x time(1 clip))`` (medians) and exits 1 unless it
is at most ``--max-ratio`` (1.5: no worse than 1.5x linear).

    uv run --frozen --all-extras python bench/bench_long_image_to_audio.py --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

from riffusion.audio import Audio
from riffusion.spectrogram import SpectrogramParams, audio_from_image, image_from_audio

CLIP_PX = 512
CLIPS = 6


def synthesised_image(width_px: int, params: SpectrogramParams) -> Image.Image:
    """A mono spectrogram ``width_px`` wide of an A-minor-seventh chord plus clicks."""
    num_samples = (width_px - 1) * params.hop_length
    t = np.arange(num_samples) / params.sample_rate
    chord = sum(0.15 * np.sin(2 * np.pi * freq * t) for freq in (220.0, 261.63, 329.63, 392.0))
    clicks = np.zeros(num_samples)
    clicks[:: params.sample_rate // 2] = 1.0
    clicks = np.convolve(clicks, np.exp(-np.arange(400) / 40.0))[:num_samples]
    samples = (chord + 0.8 * clicks).astype(np.float32)[None]
    image = image_from_audio(Audio(samples, params.sample_rate), params, device="cpu")
    assert image.width == width_px, image.size
    return image


def convert_s(image: Image.Image, seed: int) -> float:
    began = time.perf_counter()
    audio_from_image(image, device="cpu", generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed conversions of each image")
    parser.add_argument("--max-ratio", type=float, default=1.5, help="allowed slack over linear")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    params = SpectrogramParams()
    clip = synthesised_image(CLIP_PX, params)
    track = synthesised_image(CLIPS * CLIP_PX, params)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    iters = params.num_griffin_lim_iters
    print(f"images: clip {clip.width} px, track {track.width} px; Griffin-Lim x{iters}")
    # Warm-up on a narrow image: the converter's set-up and first-call costs (the
    # converter is shared by every width).
    convert_s(synthesised_image(64, params), 0)
    clip_s: list[float] = []
    track_s: list[float] = []
    for seed in range(args.rounds):
        clip_s.append(convert_s(clip, seed))
        track_s.append(convert_s(track, seed))
        print(f"round {seed}: clip {clip_s[-1]:.2f} s, track {track_s[-1]:.2f} s", flush=True)
    one, six = statistics.median(clip_s), statistics.median(track_s)
    ratio = six / (CLIPS * one)
    print(f"median: clip {one:.2f} s, track {six:.2f} s; {CLIPS} x clip = {CLIPS * one:.2f} s")
    print(f"ratio = track / ({CLIPS} x clip) = {ratio:.2f} (limit {args.max_ratio:.2f})")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    raise SystemExit(main())
