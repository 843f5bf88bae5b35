"""The library of seed and mask images in ``seed_images/``, and the code that makes it.

Seed images are spectrograms of drum-and-bass loops the project synthesises
itself (:mod:`riffusion.loop_synth`); each loop is a whole number of beats
across one 512-px model clip (5.12 s), so clips generated from it loop and
consecutive clips stay on the beat. Masks are 512x512 greyscale images for
inpainting: white = repaint, black = keep.

Lookup is by id only: an id must match ``schemas.ID_PATTERN`` and be listed in
the manifest, and the manifest's file names are plain ``<name>.png`` names, so
no id can reach a path outside the folder.
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
from riffusion.spectrogram import SpectrogramConverter, SpectrogramParams, image_from_mel_amplitudes

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
    """Seed and mask images listed in ``<directory>/manifest.json``."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory is not None else _default_directory()
        manifest_path = self.directory / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SeedImageError(
                f"no seed-image manifest at {manifest_path}; "
                "create it with `riffusion make-seed-images DIR`"
            ) from None
        except (OSError, json.JSONDecodeError) as error:
            raise SeedImageError(
                f"unreadable seed-image manifest {manifest_path}: {error}"
            ) from error
        entries = manifest.get("images") if isinstance(manifest, dict) else None
        if not isinstance(entries, list):
            raise SeedImageError(f"{manifest_path} has no 'images' list")
        self._images: dict[str, SeedImageInfo] = {}
        for position, entry in enumerate(entries):
            info = SeedImageInfo.from_manifest(entry, position)
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
        """Decode the image (seeds: RGB with spectrogram EXIF; masks: greyscale "L")."""
        path = self.path(image_id, kind)
        image = Image.open(path)
        image.load()
        return image


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
)


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
    elif mask_id == "mask_beat_lines":
        mask[:] = 255
        beat_px = CLIP_WIDTH_PX // 8
        for start in range(0, CLIP_WIDTH_PX, beat_px):
            mask[:, start : start + 16] = 0
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
