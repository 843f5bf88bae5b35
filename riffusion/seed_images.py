"""The library of seed and mask images in ``seed_images/``: listing, lookup and loading.

Seed images are spectrograms of loops the project synthesises itself
(:mod:`riffusion.seed_image_synthesis` makes the library); masks are 512x512
greyscale images for inpainting: white = repaint, black = keep.

A library folder is either the project's layout (``manifest.json`` listing
every image) or riffusion's own (``<id>.png`` seeds and ``mask_*.png`` masks,
no manifest): there the ids are the file stems found in the folder.

Lookup is by id only: an id must match :data:`ID_PATTERN` and be listed in
the manifest (or found in the folder listing), and file names are plain
``<name>.png`` names, so no id can reach a path outside the folder.

Listing needs only the standard library (``riffusion seed-images`` starts
without numpy or torch); Pillow is imported when an image is loaded.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from PIL import Image

ImageKind = Literal["seed", "mask"]
KINDS: tuple[ImageKind, ...] = ("seed", "mask")
MANIFEST_NAME = "manifest.json"
_ID = r"[a-z0-9_-]{1,64}"
ID_PATTERN = rf"^{_ID}$"
ID_OR_EMPTY_PATTERN = rf"^(?:{_ID})?$"  # also "": the web app's "no mask"
_ID_RE = re.compile(ID_PATTERN)
_FILE_RE = re.compile(rf"^{_ID}\.png$")


def is_valid_image_id(image_id: str) -> bool:
    return bool(_ID_RE.match(image_id))


# The project's own library; RIFFUSION_SEED_IMAGES_DIR overrides it, read when a
# library is opened (not at import).
SEED_IMAGES_DIR: Path = Path(__file__).resolve().parent.parent / "seed_images"


def _default_directory() -> Path:
    override = os.environ.get("RIFFUSION_SEED_IMAGES_DIR")
    return Path(override) if override else SEED_IMAGES_DIR


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
        from PIL import Image

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
