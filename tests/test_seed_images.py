"""Seed-image library: strict id lookup, manifest checks and deterministic generation."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from riffusion.loop_synth import synthesize_loop
from riffusion.seed_image_synthesis import (
    CLIP_DURATION_S,
    SEED_SPECS,
    generate_library,
    render_seed_image,
    seed_loop_frames,
)
from riffusion.seed_images import (
    SEED_IMAGES_DIR,
    SeedImageError,
    SeedImageLibrary,
    UnknownImageError,
)
from riffusion.spectrogram import SpectrogramParams, image_from_audio, params_from_image


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("seeds")
    generate_library(directory)
    return directory


@pytest.fixture(scope="module")
def library() -> SeedImageLibrary:
    return SeedImageLibrary(SEED_IMAGES_DIR)


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_generation_is_byte_identical_and_matches_committed_folder(
    generated: Path, tmp_path: Path
) -> None:
    generate_library(tmp_path)
    first, second = _files(generated), _files(tmp_path)
    assert first == second
    committed = _files(SEED_IMAGES_DIR)
    assert set(committed) == set(first), "committed seed_images/ is out of date"
    assert committed["manifest.json"] == first["manifest.json"]
    # FFT rounding differs across CPUs and torch builds: a pixel may move by a level or
    # two and tag 11080 in its last float32 digits; anything more is a real change.
    for name in sorted(set(first) - {"manifest.json"}):
        fresh, stored = Image.open(generated / name), Image.open(SEED_IMAGES_DIR / name)
        difference = np.abs(np.asarray(fresh, np.int16) - np.asarray(stored, np.int16))
        assert difference.max() <= 2 and difference.mean() < 0.05, f"seed_images/{name} changed"
        fresh_exif, stored_exif = dict(fresh.getexif()), dict(stored.getexif())
        assert fresh_exif.keys() == stored_exif.keys()
        for tag, value in fresh_exif.items():
            assert stored_exif[tag] == pytest.approx(value, rel=1e-5), f"{name} EXIF {tag}"


WEB_APP_SEEDS = ("og_beat", "agile", "marim", "motorway", "vibes")
WEB_APP_MASKS = (
    "mask_beat_lines_80",
    "mask_gradient_dark",
    "mask_gradient_top_70",
    "mask_gradient_top_fifth_75",
    "mask_top_third_75",
    "mask_top_third_95",
)


def test_every_id_the_web_app_and_riffusion_offer_exists(library: SeedImageLibrary) -> None:
    for image_id in WEB_APP_SEEDS:
        image = library.load(image_id, kind="seed")
        assert image.size == (512, 512) and params_from_image(image) == SpectrogramParams()
    for image_id in WEB_APP_MASKS:
        assert library.load(image_id, kind="mask").size == (512, 512)
    # Made by the project: each new seed has its own recipe and a description of its character.
    recipes = {spec.id: spec for spec in SEED_SPECS}
    assert "marimba" in library.info("marim").description
    assert "vibraphone" in library.info("vibes").description
    assert recipes["marim"].pattern.mallet_voice == "marimba"
    assert recipes["vibes"].pattern.mallet_voice == "vibraphone"
    assert library.info("agile").tempo_bpm == 187.5  # drum-and-bass tempo


def _mask(library: SeedImageLibrary, image_id: str) -> np.ndarray:
    return np.asarray(library.load(image_id, kind="mask"), dtype=np.int16)


def test_riffusion_masks_have_the_strength_their_names_say(library: SeedImageLibrary) -> None:
    for percent in (75, 95):
        mask = _mask(library, f"mask_top_third_{percent}")
        assert (mask[:170] == round(2.55 * percent)).all() and (mask[171:] == 0).all()
    beats = _mask(library, "mask_beat_lines_80")
    assert (beats[:, 0:16] == 0).all() and (beats[:, 20:60] == 204).all()
    top_70 = _mask(library, "mask_gradient_top_70")
    assert top_70[0, 0] == 178 and top_70[-1, 0] == 0 and (np.diff(top_70[:, 0]) <= 0).all()
    fifth = _mask(library, "mask_gradient_top_fifth_75")
    assert fifth[0, 0] == 191 and (fifth[512 // 5 :] == 0).all()
    dark = _mask(library, "mask_gradient_dark")
    assert dark[0, 0] == 0 and dark[0, -1] == 128 and (np.diff(dark[0]) >= 0).all()


def _riffusion_folder(directory: Path) -> Path:
    """riffusion's layout: <id>.png seeds (og_beat as a palette PNG, as riffusion ships it),
    mask_*.png masks, no manifest, plus files that are not valid ids."""
    rgb = Image.open(SEED_IMAGES_DIR / "og_beat.png").convert("RGB")
    rgb.quantize(colors=256).save(directory / "og_beat.png")
    rgb.convert("L").save(directory / "grey_beat.png")
    rgb.save(directory / "agile.png")
    Image.open(SEED_IMAGES_DIR / "mask_top_third.png").convert("RGB").save(
        directory / "mask_top_third_95.png"
    )
    Image.fromarray(np.full((512, 512), 128, np.uint8)).quantize(4).save(directory / "mask_p.png")
    (directory / "Not An Id.png").write_bytes(b"")
    (directory / "notes.txt").write_text("not an image")
    return directory


def test_riffusion_layout_folder_without_manifest(tmp_path: Path) -> None:
    library = SeedImageLibrary(_riffusion_folder(tmp_path))
    assert library.ids("seed") == ["agile", "grey_beat", "og_beat"]
    assert library.ids("mask") == ["mask_p", "mask_top_third_95"]
    assert Image.open(tmp_path / "og_beat.png").mode == "P"
    original = np.asarray(Image.open(SEED_IMAGES_DIR / "og_beat.png"), np.int16)
    palette_seed = library.load("og_beat", kind="seed")
    assert palette_seed.mode == "RGB" and palette_seed.size == (512, 512)
    assert np.abs(np.asarray(palette_seed, np.int16) - original).mean() < 2
    grey_seed = library.load("grey_beat", kind="seed")
    assert grey_seed.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(grey_seed)[..., 0], np.asarray(grey_seed)[..., 2])
    mask = library.load("mask_top_third_95", kind="mask")
    assert mask.mode == "L" and np.asarray(mask)[0, 0] == 255 and np.asarray(mask)[-1, 0] == 0
    assert (np.asarray(library.load("mask_p", kind="mask")) == 128).all()
    # Ids are still validated and looked up; file names never come from the caller.
    for bad_id in ("../og_beat", "og_beat.png", "notes", "Not An Id", "mask_p.png"):
        with pytest.raises(UnknownImageError):
            library.load(bad_id)
    with pytest.raises(UnknownImageError, match="unknown seed image id 'mask_p'"):
        library.info("mask_p", kind="seed")


def test_riffusion_layout_folder_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RIFFUSION_SEED_IMAGES_DIR", str(_riffusion_folder(tmp_path)))
    assert SeedImageLibrary().load("og_beat", kind="seed").mode == "RGB"


def test_library_contents(library: SeedImageLibrary) -> None:
    seeds, masks = library.list("seed"), library.list("mask")
    assert "og_beat" in library.ids("seed")
    assert len({info.tempo_bpm for info in seeds}) >= 5
    assert len(masks) >= 4
    assert all(info.tempo_bpm is None for info in masks)
    assert all(info.description for info in library.list())
    assert library.list() == seeds + masks


def test_manifest_tempos_give_whole_beats_across_the_clip(library: SeedImageLibrary) -> None:
    for info in library.list("seed"):
        assert info.tempo_bpm is not None
        # Exact rational arithmetic: the tempos are chosen to be binary-exact floats.
        beats = Fraction(info.tempo_bpm) * CLIP_DURATION_S / 60
        assert beats.denominator == 1, f"{info.id}: {beats} beats in the clip"
        assert beats >= 4


def test_seed_images_are_spectrograms_and_loops(library: SeedImageLibrary) -> None:
    for info in library.list("seed"):
        image = library.load(info.id, kind="seed")
        assert image.size == (512, 512) and image.mode == "RGB"
        assert params_from_image(image) == SpectrogramParams()
        assert 11080 in image.getexif()  # the source spectrogram's max is recorded
    # Loop length is exactly the clip: 512 hops at 44.1 kHz.
    assert seed_loop_frames() == 512 * 441


def test_rendered_loop_is_seamless() -> None:
    """Rotating og_beat's audio by one beat (64 px) rolls its image by exactly 64 columns."""
    spec = next(spec for spec in SEED_SPECS if spec.id == "og_beat")
    image = np.asarray(render_seed_image(spec), dtype=np.int16)
    frames_per_beat = seed_loop_frames() // spec.pattern.beats
    assert frames_per_beat == 64 * 441
    # Reference: render the loop repeated three times the ordinary (non-circular)
    # way and take the middle copy, which sees real neighbours at both edges.
    loop = synthesize_loop(spec.pattern, seed_loop_frames())
    tiled = type(loop)(np.tile(loop.samples, 3), loop.sample_rate)
    middle = np.asarray(image_from_audio(tiled, SpectrogramParams()), dtype=np.int16)[:, 512:1024]
    # Same content up to the clip max (the tiled image is scaled by the same max): within 1 level.
    assert np.abs(middle - image).max() <= 1
    # And the edges are not faded: the first and last columns are as dark as the rest on average.
    darkness = 255 - image[..., 0].mean(axis=0)
    assert darkness[:4].mean() > 0.5 * darkness.mean()


def test_masks_white_means_repaint(library: SeedImageLibrary) -> None:
    top = np.asarray(library.load("mask_top_third", kind="mask"))
    assert top.shape == (512, 512)
    assert (top[:170] == 255).all() and (top[171:] == 0).all()
    left = np.asarray(library.load("mask_left_half", kind="mask"))
    assert (left[:, :256] == 255).all() and (left[:, 256:] == 0).all()
    gradient = np.asarray(library.load("mask_gradient", kind="mask"))
    assert gradient[0, 0] == 0 and gradient[0, -1] == 255
    assert (np.diff(gradient[0].astype(int)) >= 0).all()
    beats = np.asarray(library.load("mask_beat_lines", kind="mask"))
    assert (beats[:, 0:16] == 0).all() and (beats[:, 64:80] == 0).all()
    assert (beats[:, 20:60] == 255).all()


@pytest.mark.parametrize(
    "bad_id",
    [
        "../x",
        "og_beat.png",
        "/etc/passwd",
        str(SEED_IMAGES_DIR / "og_beat.png"),
        "OG_BEAT",
        "",
        "a/b",
    ],
)
def test_lookup_rejects_malformed_ids(library: SeedImageLibrary, bad_id: str) -> None:
    with pytest.raises(UnknownImageError, match="invalid image id") as error:
        library.load(bad_id)
    assert "og_beat" in str(error.value) and "mask_top_third" in str(error.value)
    assert error.value.valid_ids == library.ids()


def test_lookup_rejects_unknown_and_wrong_kind(library: SeedImageLibrary) -> None:
    with pytest.raises(UnknownImageError, match="unknown image id 'no_such_seed'") as error:
        library.info("no_such_seed")
    for image_id in library.ids():
        assert image_id in str(error.value)
    with pytest.raises(UnknownImageError, match="unknown mask image id 'og_beat'") as error:
        library.info("og_beat", kind="mask")
    assert error.value.valid_ids == library.ids("mask")
    with pytest.raises(SeedImageError, match="unknown image kind"):
        library.list("drums")


def _write_manifest(directory: Path, images: list[dict[str, object]]) -> None:
    (directory / "manifest.json").write_text(json.dumps({"images": images}))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": "x", "kind": "seed", "file": "../../etc/passwd"}, "expected a plain <name>.png"),
        ({"id": "x", "kind": "seed", "file": "/etc/x.png"}, "expected a plain <name>.png"),
        ({"id": "../x", "kind": "seed", "file": "x.png"}, "invalid id"),
        ({"id": "x", "kind": "drums", "file": "x.png"}, "invalid kind"),
        ({"id": "x", "kind": "seed", "file": "x.png", "tempo_bpm": -3}, "invalid tempo"),
    ],
)
def test_manifest_entries_validated(tmp_path: Path, entry: dict[str, object], problem: str) -> None:
    _write_manifest(tmp_path, [entry])
    with pytest.raises(SeedImageError, match=problem):
        SeedImageLibrary(tmp_path)


def test_empty_or_missing_folder_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SeedImageError, match=r"no manifest\.json and no <id>\.png images"):
        SeedImageLibrary(tmp_path)
    with pytest.raises(SeedImageError, match="does not exist"):
        SeedImageLibrary(tmp_path / "nowhere")
    _write_manifest(tmp_path, [{"id": "ghost", "kind": "seed", "file": "ghost.png"}])
    with pytest.raises(SeedImageError, match=r"ghost\.png is missing"):
        SeedImageLibrary(tmp_path).load("ghost")


def test_directory_override_from_environment(
    monkeypatch: pytest.MonkeyPatch, generated: Path
) -> None:
    monkeypatch.setenv("RIFFUSION_SEED_IMAGES_DIR", str(generated))
    library = SeedImageLibrary()
    assert library.directory == generated
    assert isinstance(library.load("og_beat"), Image.Image)
