"""The library of seed and mask images in ``seed_images/``, and the code that makes it.

Seed images are spectrograms of drum-and-bass loops the project synthesises
itself (:mod:`riffusion.loop_synth`); each loop is a whole number of beats
across one 512-px model clip (5.12 s), so clips generated from it loop and
consecutive clips stay on the beat. Masks are 512x512 greyscale images for
inpainting: white = repaint, black = keep.

A library folder is either the project's layout (``manifest.json`` listing
every image) or riffusion's own (``<id>.png`` seeds and ``mask_*.png`` masks,
no manifest): there the ids are the file stems found in the folder.

Lookup is by id only: an id must match ``schemas.ID_PATTERN`` and be listed in
the manifest (or found in the folder listing), and file names are plain
``<name>.png`` names, so no id can reach a path outside the folder.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from riffusion.loop_synth import LoopPattern, synthesize_loop
from riffusion.schemas import is_valid_image_id
from riffusion.spectrogram import (
    SpectrogramConverter,
    SpectrogramParams,
    image_from_mel_amplitudes,
)

ImageKind = Literal["seed", "mask"]
KINDS: tuple[ImageKind, ...] = ("seed", "mask")
MANIFEST_NAME = "manifest.json"
CLIP_WIDTH_PX = 512
IMAGE_HEIGHT_PX = 512
# One model clip: 512 columns of 10 ms.
CLIP_DURATION_S = Fraction(CLIP_WIDTH_PX * 10, 1000)
_FILE_RE = re.compile(r"^[a-z0-9_-]{1,64}\.png$")


def _default_directory() -> Path:
    override = os.environ.get("RIFFUSION_SEED_IMAGES_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "seed_images"


SEED_IMAGES_DIR: Path = _default_directory()


class SeedImageError(ValueError):
    """The seed-image library or a request to it cannot be used; the message says why."""


class UnknownImageError(SeedImageError):
    """An image id that is malformed or not in the manifest; the message lists the valid ids."""

    def __init__(self, message: str, valid_ids: list[str]) -> None:
        super().__init__(message)
        self.valid_ids = valid_ids


@dataclass(frozen=True)
class SeedImageInfo:
    """One manifest entry."""

    id: str
    kind: ImageKind
    tempo_bpm: float | None
    description: str
    file: str = ""

    def __post_init__(self) -> None:
        if not self.file:
            object.__setattr__(self, "file", f"{self.id}.png")

    @classmethod
    def from_manifest(cls, entry: Any, position: int) -> SeedImageInfo:
        """Validate one manifest entry; bad ids, kinds or file names are refused."""
        if not isinstance(entry, dict):
            raise SeedImageError(f"manifest entry {position} is not an object")
        image_id, kind, file = entry.get("id"), entry.get("kind"), entry.get("file")
        if not isinstance(image_id, str) or not is_valid_image_id(image_id):
            raise SeedImageError(f"manifest entry {position} has an invalid id {image_id!r}")
        if kind not in KINDS:
            raise SeedImageError(f"manifest entry {image_id!r} has an invalid kind {kind!r}")
        if not isinstance(file, str) or not _FILE_RE.match(file):
            raise SeedImageError(
                f"manifest entry {image_id!r} has file {file!r}; expected a plain <name>.png"
            )
        tempo = entry.get("tempo_bpm")
        if tempo is not None and not (isinstance(tempo, int | float) and tempo > 0):
            raise SeedImageError(f"manifest entry {image_id!r} has an invalid tempo {tempo!r}")
        return cls(
            id=image_id,
            kind=kind,
            tempo_bpm=None if tempo is None else float(tempo),
            description=str(entry.get("description", "")),
            file=file,
        )


class SeedImageLibrary:
    """Seed and mask images listed in ``<directory>/manifest.json``, or found in a
    riffusion-layout folder without a manifest (``<id>.png`` seeds, ``mask_*.png`` masks).
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else _default_directory()
        manifest_path = self.directory / MANIFEST_NAME
        if not self.directory.is_dir():
            raise SeedImageError(f"seed-image folder {self.directory} does not exist")
        self._images: dict[str, SeedImageInfo] = {}
        if manifest_path.exists():
            infos = _read_manifest(manifest_path)
        else:
            infos = _scan_riffusion_layout(self.directory)
        for info in infos:
            if info.id in self._images:
                raise SeedImageError(f"{manifest_path} lists the id {info.id!r} twice")
            self._images[info.id] = info

    def list(self, kind: str | None = None) -> list[SeedImageInfo]:
        """Manifest entries, optionally only seeds or only masks, in manifest order."""
        _check_kind(kind)
        return [info for info in self._images.values() if kind is None or info.kind == kind]

    def ids(self, kind: str | None = None) -> builtins.list[str]:
        return [info.id for info in self.list(kind)]

    def info(self, image_id: str, kind: str | None = None) -> SeedImageInfo:
        """The entry for ``image_id``; UnknownImageError if malformed, unknown or wrong kind."""
        _check_kind(kind)
        valid = self.ids(kind)
        what = f"{kind} image" if kind else "image"
        valid_text = ", ".join(valid) if valid else "(none)"
        if not isinstance(image_id, str) or not is_valid_image_id(image_id):
            raise UnknownImageError(
                f"invalid {what} id {image_id!r}: ids use only a-z, 0-9, '_' and '-'; "
                f"valid ids: {valid_text}",
                valid,
            )
        info = self._images.get(image_id)
        if info is None or (kind is not None and info.kind != kind):
            raise UnknownImageError(
                f"unknown {what} id {image_id!r}; valid ids: {valid_text}", valid
            )
        return info

    def path(self, image_id: str, kind: str | None = None) -> Path:
        """The file of a validated id (always directly inside the library folder)."""
        info = self.info(image_id, kind)
        path = self.directory / info.file
        if not path.is_file():
            raise SeedImageError(f"image {image_id!r} is in the manifest but {path} is missing")
        return path

    def load(self, image_id: str, kind: str | None = None) -> Image.Image:
        """Decode the image: seeds as RGB (EXIF kept), masks as greyscale "L".

        Palette ("P", as riffusion's own og_beat.png) and greyscale files are converted.
        """
        info = self.info(image_id, kind)
        path = self.path(image_id, kind)
        try:
            image = Image.open(path)
            image.load()
        except (OSError, SyntaxError) as error:
            raise SeedImageError(f"image {image_id!r} ({path}) is not a readable PNG") from error
        return _as_mode(image, "RGB" if info.kind == "seed" else "L")


def _as_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode``; info (and so EXIF) is carried over by Pillow's convert."""
    if image.mode == mode:
        return image
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        # Through RGBA so palette transparency is resolved, then drop alpha: spectrogram
        # and mask pixels are the colour values.
        image = image.convert("RGBA")
    return image.convert(mode)


def _read_manifest(manifest_path: Path) -> list[SeedImageInfo]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SeedImageError(f"unreadable seed-image manifest {manifest_path}: {error}") from error
    entries = manifest.get("images") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise SeedImageError(f"{manifest_path} has no 'images' list")
    return [SeedImageInfo.from_manifest(entry, position) for position, entry in enumerate(entries)]


def _scan_riffusion_layout(directory: Path) -> list[SeedImageInfo]:
    """Riffusion's folder layout: every ``<id>.png`` is a seed, ``mask_<name>.png`` a mask.

    Files whose stem is not a valid id are skipped, so the ids offered are exactly
    the ones requests may use.
    """
    infos = [
        SeedImageInfo(
            id=path.stem,
            kind="mask" if path.stem.startswith("mask_") else "seed",
            tempo_bpm=None,
            description=f"{path.name} from {directory.name}/",
            file=path.name,
        )
        for path in sorted(directory.iterdir())
        if path.suffix == ".png" and _FILE_RE.match(path.name) and path.is_file()
    ]
    if not infos:
        raise SeedImageError(
            f"no {MANIFEST_NAME} and no <id>.png images in {directory}; create a library "
            "with `riffusion make-seed-images DIR` or use riffusion's seed_images folder"
        )
    return infos


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise SeedImageError(f"unknown image kind {kind!r}; use one of {', '.join(KINDS)}")


# ----------------------------------------------------------------------------- generation


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
