"""CPU benchmark: image-to-audio scales linearly, a 30.72 s track against one 5.12 s clip.

``riffusion image-to-audio`` on a long track's spectrogram runs the same Griffin-Lim
(32 iterations) over every column: its time should grow with the width, so a track
of six clips (3072 px, 30.72 s) should cost about six times one clip (512 px).
Both images are synthesised from the same signal (a chord plus clicks) and converted
by ``riffusion.spectrogram.audio_from_image``, alternating within one process so CPU
contention hits both alike, after one untimed warm-up conversion of a narrow image.

Prints ``ratio = time(6 clips) / (6 x time(1 clip))`` (medians) and exits 1 unless it
is at most ``--max-ratio`` (1.5: no worse than 1.5x linear).

    uv run --frozen --all-extras python -m bench.bench_long_image_to_audio --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from PIL import Image

from bench.bench_image_to_audio import synthesised_image
from riffusion.spectrogram import SpectrogramParams, audio_from_image

CLIP_PX = 512
CLIPS = 6


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
    clip = synthesised_image(params, CLIP_PX)
    track = synthesised_image(params, CLIPS * CLIP_PX)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    iters = params.num_griffin_lim_iters
    print(f"images: clip {clip.width} px, track {track.width} px; Griffin-Lim x{iters}")
    # Warm-up on a narrow image: the converter's set-up and first-call costs (the
    # converter is shared by every width).
    convert_s(synthesised_image(params, 64), 0)
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
