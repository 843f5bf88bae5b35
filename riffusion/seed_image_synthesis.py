"""The code that makes the seed-image library (``riffusion make-seed-images``).

Seed images are spectrograms of drum-and-bass loops the project synthesises
itself (:mod:`riffusion.loop_synth`); each loop is a whole number of beats
across one 512-px model clip (5.12 s), so clips generated from it loop and
consecutive clips stay on the beat. Masks are drawn from their recipes here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from riffusion.loop_synth import LoopPattern, synthesize_loop
from riffusion.seed_images import MANIFEST_NAME, SeedImageError, SeedImageInfo
from riffusion.spectrogram import (
    SpectrogramConverter,
    SpectrogramParams,
    image_from_mel_amplitudes,
)

CLIP_WIDTH_PX = 512
IMAGE_HEIGHT_PX = 512
# One model clip: 512 columns of 10 ms.
CLIP_DURATION_S = Fraction(CLIP_WIDTH_PX * 10, 1000)


@dataclass(frozen=True)
class SeedSpec:
    id: str
    description: str
    pattern: LoopPattern


@dataclass(frozen=True)
class MaskSpec:
    id: str
    description: str


def _bars(*bars: str) -> tuple[str, ...]:
    return bars


# A1 = 55 Hz root: the bass sits in the lowest mel rows, the drums above it.
SEED_SPECS: tuple[SeedSpec, ...] = (
    SeedSpec(
        "og_beat",
        "boom-bap drums and a minor bass line, 2 bars of 4/4 (the web app's default seed)",
        LoopPattern(
            beats=8,
            beats_per_bar=4,
            kick=_bars("x.....x...x.....", "x.....x..x..x..."),
            snare=_bars("....x.......x...", "....x.......x..x"),
            hats=_bars("x.x.x.x.x.x.x.x.", "x.x.x.x.x.x.x.o."),
            bass=_bars(
                "0 - - - . . 0 - - - 3 - . . 5 -",
                "0 - - - . . 0 - - 7 - - 5 - 3 -",
            ),
            root_hz=55.0,
            seed=1,
        ),
    ),
    SeedSpec(
        "waltz",
        "brushed waltz: kick on one, snare on two and three, walking bass, 2 bars of 3/4",
        LoopPattern(
            beats=6,
            beats_per_bar=3,
            kick=_bars("x...........", "x.........x."),
            snare=_bars("....x...x...", "....x...x..."),
            hats=_bars("x.x.x.x.x.x.", "x.x.x.x.x.o."),
            bass=_bars("0 - - - 7 - - - 12 - - -", "5 - - - 4 - - - 2 - - -"),
            root_hz=55.0,
            seed=2,
        ),
    ),
    SeedSpec(
        "seven_four",
        "odd-meter groove in 7/4 with a syncopated bass riff, 1 bar",
        LoopPattern(
            beats=7,
            beats_per_bar=7,
            kick=_bars("x.....x...x.....x...x...x..."),
            snare=_bars("....x.......x.......x.....x."),
            hats=_bars("x.x.x.x.x.x.x.x.x.x.x.x.x.x."),
            bass=_bars("0 - - 0 - - 3 - - - 5 - - - 7 - - 5 - - 3 - - - 0 - - -"),
            root_hz=49.0,
            seed=3,
        ),
    ),
    SeedSpec(
        "swing_waltz",
        "swung jazz waltz with ride-style hats and a pedal bass, 3 bars of 3/4",
        LoopPattern(
            beats=9,
            beats_per_bar=3,
            kick=_bars("x...........", "x.......x...", "x..........."),
            snare=_bars("......x.....", "....x.......", "......x...x."),
            hats=_bars("x...x.x.x.x.", "x...x.x.x.x.", "x...x.x.x.o."),
            bass=_bars(
                "0 - - - 0 - - - 7 - - -", "3 - - - 3 - - - 7 - - -", "5 - - - 7 - - - 10 - - -"
            ),
            root_hz=55.0,
            seed=4,
            swing=0.33,
        ),
    ),
    SeedSpec(
        "house",
        "four-on-the-floor house: kick every beat, clap on 2 and 4, open off-beat hats, 3 bars",
        LoopPattern(
            beats=12,
            beats_per_bar=4,
            kick=_bars("x...x...x...x..."),
            snare=_bars("....x.......x..."),
            hats=_bars("x.o.x.o.x.o.x.o."),
            bass=_bars(
                ". . 0 - . . 0 - . . 0 - . . 3 -",
                ". . 0 - . . 0 - . . 5 - . . 3 -",
                ". . 0 - . . 0 - . . 7 - . . 5 -",
            ),
            root_hz=55.0,
            seed=5,
        ),
    ),
    SeedSpec(
        "breakbeat",
        "fast breakbeat (drum and bass tempo) over a long sub-bass, 4 bars of 4/4",
        LoopPattern(
            beats=16,
            beats_per_bar=4,
            kick=_bars("x.........x.....", "x.x.......x....."),
            snare=_bars("....x..x.x..x...", "....x..x.x..x..x"),
            hats=_bars("x.x.x.x.x.x.x.x."),
            bass=_bars(
                "0 - - - - - - - - - - - - - - -",
                "0 - - - - - - - - - - - 3 - - -",
                "-5 - - - - - - - - - - - - - - -",
                "-2 - - - - - - - - - - - -4 - - -",
            ),
            root_hz=55.0,
            seed=6,
        ),
    ),
)

# The seeds the riffusion web app offers besides og_beat, made the same way.
SEED_SPECS += (
    SeedSpec(
        "agile",
        "agile: a fast, busy breakbeat with ghost snares and short bass stabs, 4 bars of 4/4",
        LoopPattern(
            beats=16,
            beats_per_bar=4,
            kick=_bars(
                "x.x.......x.....", "x.........x..x..", "x.x.......x.....", "x.......x.x.x..."
            ),
            snare=_bars(
                "....x..x.x..x..x", "....x.x..x..x...", "....x..x.x..x..x", ".x..x....x..x.xx"
            ),
            hats=_bars("x.xxx.x.x.xxx.x.", "x.xxx.x.x.xxx.o."),
            bass=_bars(
                "0 . . 0 . . . . 3 - . . . . 5 .",
                "0 . . 0 . . . . 7 - . . 5 . 3 .",
                "0 . . 0 . . . . 3 - . . . . 5 .",
                "-2 . . -2 . . . . -5 - . . 3 . 5 .",
            ),
            root_hz=55.0,
            seed=7,
        ),
    ),
    SeedSpec(
        "marim",
        "marimba arpeggios in A minor over a soft kick, hats and bass, 2 bars of 5/4",
        LoopPattern(
            beats=10,
            beats_per_bar=5,
            kick=_bars("x.........x........."),
            snare=_bars("........x.........x."),
            hats=_bars("..x...x...x...x...x."),
            bass=_bars(
                "0 - - - - - . . 7 - - - - - . . 5 - . .",
                "-4 - - - - - . . 3 - - - - - . . -2 - . .",
            ),
            root_hz=55.0,
            seed=8,
            mallet=_bars(
                "0 . 7 . 12 . 7 . 3 . 10 . 7 . 15 . 12 . 7 .",
                "-4 . 3 . 8 . 3 . 0 . 7 . 3 . 12 . 10 . 7 .",
            ),
            mallet_voice="marimba",
            mallet_root_hz=220.0,
            bass_level=0.6,
        ),
    ),
    SeedSpec(
        "motorway",
        "driving motorway groove: steady eighth-note bass and hats, kick and backbeat, 3 bars",
        LoopPattern(
            beats=12,
            beats_per_bar=4,
            kick=_bars("x.x.....x.x.....", "x.x.....x.x.....", "x.x.....x.x...x."),
            snare=_bars("....x.......x..."),
            hats=_bars("x.x.x.x.x.x.x.x."),
            bass=_bars(
                "0 - 0 - 0 - 0 - 0 - 0 - 0 - 0 -",
                "0 - 0 - 0 - 0 - 5 - 5 - 5 - 5 -",
                "3 - 3 - 3 - 3 - 7 - 7 - 5 - 3 -",
            ),
            root_hz=55.0,
            seed=9,
        ),
    ),
    SeedSpec(
        "vibes",
        "vibraphone seventh chords with tremolo over brushed swing drums and bass, 2 bars of 4/4",
        LoopPattern(
            beats=8,
            beats_per_bar=4,
            kick=_bars("x.........x....."),
            snare=_bars("....x.......x..."),
            hats=_bars("x...x.x.x...x.x."),
            bass=_bars("0 - - - 4 - - - 7 - - - 9 - - -", "5 - - - 4 - - - 2 - - - -1 - - -"),
            root_hz=55.0,
            seed=10,
            swing=0.3,
            mallet=_bars(
                "0+3+7+10 - - - - - . . 5+8+12+15 - - - - - . .",
                "3+7+10+14 - - - - - . . 2+5+8+12 - - - . . . .",
            ),
            mallet_voice="vibraphone",
            mallet_root_hz=220.0,
            bass_level=0.7,
        ),
    ),
)

MASK_SPECS: tuple[MaskSpec, ...] = (
    MaskSpec("mask_top_third", "repaint the top third (highs above ~3.6 kHz), keep lows and mids"),
    MaskSpec("mask_left_half", "repaint the first 2.56 s, keep the second half"),
    MaskSpec("mask_gradient", "left-to-right ramp from keep (black) to repaint (white)"),
    MaskSpec(
        "mask_beat_lines", "keep 160 ms at each beat of og_beat's 8-beat grid, repaint the rest"
    ),
    MaskSpec(
        "mask_bottom_third", "repaint the bottom third (below ~1 kHz: bass and kick), keep the rest"
    ),
    # The masks riffusion's server offered: the name says the region and the strength
    # in percent (grey level = strength x 255; white = repaint fully).
    MaskSpec(
        "mask_beat_lines_80",
        "keep 160 ms at each beat of og_beat's 8-beat grid, repaint the rest at 80 %",
    ),
    MaskSpec("mask_gradient_dark", "left-to-right ramp from keep (black) to 50 % repaint"),
    MaskSpec("mask_gradient_top_70", "top-to-bottom ramp from 70 % repaint (highs) to keep (lows)"),
    MaskSpec(
        "mask_gradient_top_fifth_75",
        "top fifth (highs above ~6 kHz) ramps from 75 % repaint to keep; the rest is kept",
    ),
    MaskSpec("mask_top_third_75", "repaint the top third (highs above ~3.6 kHz) at 75 %"),
    MaskSpec("mask_top_third_95", "repaint the top third (highs above ~3.6 kHz) at 95 %"),
)


def _level(percent: float) -> int:
    """Grey level of a mask region repainted at ``percent`` strength."""
    return round(255 * percent / 100)


def mask_pixels(mask_id: str) -> np.ndarray:
    """uint8 (512, 512) mask: 255 = repaint, 0 = keep. Row 0 is the top (high frequencies)."""
    mask = np.zeros((IMAGE_HEIGHT_PX, CLIP_WIDTH_PX), dtype=np.uint8)
    third = IMAGE_HEIGHT_PX // 3
    if mask_id == "mask_top_third":
        mask[:third] = 255
    elif mask_id == "mask_bottom_third":
        mask[-third:] = 255
    elif mask_id == "mask_left_half":
        mask[:, : CLIP_WIDTH_PX // 2] = 255
    elif mask_id == "mask_gradient":
        ramp = np.round(np.linspace(0, 255, CLIP_WIDTH_PX)).astype(np.uint8)
        mask[:] = ramp[None, :]
    elif mask_id in ("mask_beat_lines", "mask_beat_lines_80"):
        mask[:] = 255 if mask_id == "mask_beat_lines" else _level(80)
        beat_px = CLIP_WIDTH_PX // 8
        for start in range(0, CLIP_WIDTH_PX, beat_px):
            mask[:, start : start + 16] = 0
    elif mask_id == "mask_gradient_dark":
        mask[:] = np.round(np.linspace(0, _level(50), CLIP_WIDTH_PX)).astype(np.uint8)[None, :]
    elif mask_id == "mask_gradient_top_70":
        mask[:] = np.round(np.linspace(_level(70), 0, IMAGE_HEIGHT_PX)).astype(np.uint8)[:, None]
    elif mask_id == "mask_gradient_top_fifth_75":
        fifth = IMAGE_HEIGHT_PX // 5
        mask[:fifth] = np.round(np.linspace(_level(75), 0, fifth)).astype(np.uint8)[:, None]
    elif mask_id in ("mask_top_third_75", "mask_top_third_95"):
        mask[:third] = _level(int(mask_id.rsplit("_", 1)[1]))
    else:
        raise SeedImageError(f"no mask recipe for {mask_id!r}")
    return mask


def seed_loop_frames(sample_rate: int = 44100) -> int:
    """Samples in one clip: exactly ``CLIP_DURATION_S`` (512 hops)."""
    frames = CLIP_DURATION_S * sample_rate
    if frames.denominator != 1:
        raise SeedImageError(f"{sample_rate} Hz has no whole number of samples in the clip")
    return int(frames)


def render_seed_image(spec: SeedSpec, converter: SpectrogramConverter | None = None) -> Image.Image:
    """Spectrogram image of the loop, computed as if the loop repeated forever.

    The STFT is taken over the loop padded circularly by half the FFT size, and
    the 512 frames centred on the loop's own samples are kept, so the image's
    right edge continues into its left edge instead of fading at reflect padding.
    """
    if converter is None:
        converter = SpectrogramConverter(SpectrogramParams(), device="cpu")
    params = converter.params
    loop = synthesize_loop(spec.pattern, seed_loop_frames(params.sample_rate), params.sample_rate)
    pad = params.n_fft // 2
    if pad % params.hop_length:
        raise SeedImageError("half the FFT size must be a whole number of hops")
    waveform = torch.from_numpy(
        np.concatenate([loop.samples[:, -pad:], loop.samples, loop.samples[:, :pad]], axis=1)
    )
    amplitudes = converter.mel_amplitudes_from_waveform(waveform)
    first = pad // params.hop_length
    return image_from_mel_amplitudes(amplitudes[:, :, first : first + CLIP_WIDTH_PX], params)


def generate_library(directory: Path | str) -> list[SeedImageInfo]:
    """Write every seed and mask image plus the manifest into ``directory`` (deterministic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    infos: list[SeedImageInfo] = []
    # Always on CPU: the PNGs must be byte-identical wherever they are regenerated.
    converter = SpectrogramConverter(SpectrogramParams(), device="cpu")
    for spec in SEED_SPECS:
        image = render_seed_image(spec, converter)
        image.save(directory / f"{spec.id}.png", format="PNG", exif=image.getexif())
        tempo = spec.pattern.tempo_bpm(CLIP_DURATION_S)
        infos.append(SeedImageInfo(spec.id, "seed", tempo, spec.description))
    for mask in MASK_SPECS:
        Image.fromarray(mask_pixels(mask.id)).save(directory / f"{mask.id}.png")
        infos.append(SeedImageInfo(mask.id, "mask", None, mask.description))
    manifest = {
        "clip_duration_s": float(CLIP_DURATION_S),
        "images": [asdict(info) for info in infos],
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return infos
