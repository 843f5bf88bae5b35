"""`riffusion text-to-audio`, `riff` and `interpolate` end to end with --model tiny."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from riffusion.audio import Audio, read_audio, write_audio
from riffusion.cli import cli, hub
from riffusion.riff import clip_init_image_png

FAST = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--griffin-lim-iters", "2"]


def tone(seconds: float, sample_rate: int = 44100) -> Audio:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return Audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], sample_rate)


@pytest.fixture()
def seed_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A library with one narrow (64 px) seed image, used through RIFFUSION_SEED_IMAGES_DIR."""
    directory = tmp_path / "seed_images"
    directory.mkdir()
    (directory / "short_beat.png").write_bytes(clip_init_image_png(tone(0.7)))
    manifest = {"images": [{"id": "short_beat", "kind": "seed", "file": "short_beat.png"}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("RIFFUSION_SEED_IMAGES_DIR", str(directory))
    return directory


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_text_to_audio_writes_audio_and_image(tmp_path: Path) -> None:
    output, image = tmp_path / "clip.wav", tmp_path / "clip.png"
    code, text = invoke(
        [
            "text-to-audio",
            "funky bass",
            "-o",
            str(output),
            "--duration",
            "0.64",
            "--image",
            str(image),
            "--seed",
            "5",
            *FAST,
        ]
    )
    assert code == 0, text
    audio = read_audio(output)
    assert audio.sample_rate == 44100
    assert audio.num_frames == (64 - 1) * 441
    assert Image.open(image).size == (64, 512)
    assert "TINY" in text


def test_riff_writes_a_crossfaded_file_as_long_as_the_input(tmp_path: Path) -> None:
    source, output = tmp_path / "in.wav", tmp_path / "out.flac"
    write_audio(tone(1.5), source)
    code, text = invoke(
        [
            "riff",
            str(source),
            "-o",
            str(output),
            "--prompt",
            "harp",
            "--end-prompt",
            "synth",
            "--clip-duration",
            "0.72",
            "--overlap",
            "0.1",
            "--batch-size",
            "2",
            *FAST,
        ]
    )
    assert code == 0, text
    assert "3 clips" in text
    riffed = read_audio(output)
    assert riffed.num_frames == tone(1.5).num_frames


def test_interpolate_writes_stitched_audio_and_clip_images(
    tmp_path: Path, seed_library: Path
) -> None:
    output, images = tmp_path / "walk.wav", tmp_path / "images"
    code, text = invoke(
        [
            "interpolate",
            "-o",
            str(output),
            "--start-prompt",
            "jazz",
            "--end-prompt",
            "techno",
            "--num-clips",
            "3",
            "--seed-image-id",
            "short_beat",
            "--overlap",
            "0.1",
            "--images-dir",
            str(images),
            *FAST,
        ]
    )
    assert code == 0, text
    clip_frames = (64 - 1) * 441
    assert read_audio(output).num_frames == 3 * clip_frames - 2 * 4410
    assert sorted(p.name for p in images.iterdir()) == [
        "clip_000.png",
        "clip_001.png",
        "clip_002.png",
    ]


def test_unknown_seed_image_is_a_one_line_error(tmp_path: Path, seed_library: Path) -> None:
    code, text = invoke(
        [
            "interpolate",
            "-o",
            str(tmp_path / "x.wav"),
            "--start-prompt",
            "a",
            "--end-prompt",
            "b",
            "--seed-image-id",
            "no_such_beat",
            *FAST,
        ]
    )
    assert code != 0
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "no_such_beat" in lines[0] and "short_beat" in lines[0]
    assert not (tmp_path / "x.wav").exists()


def test_unreadable_riff_input_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    code, text = invoke(["riff", str(bad), "-o", str(tmp_path / "o.wav"), "--prompt", "x", *FAST])
    assert code != 0
    assert text.startswith("Error:") and len(text.strip().splitlines()) == 1


def test_model_comes_from_riffusion_model_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RIFFUSION_MODEL", "tiny")
    output = tmp_path / "clip.wav"
    fast_without_model = [arg for arg in FAST if arg not in ("--model", "tiny")]
    code, text = invoke(
        ["text-to-audio", "bells", "-o", str(output), "--duration", "0.64", *fast_without_model]
    )
    assert code == 0, text
    assert "model tiny" in text and output.is_file()


def test_unreachable_hub_fails_at_once_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No retries and no misleading 'scheduler_config.json': one line naming the fixes."""
    monkeypatch.delenv("RIFFUSION_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "huggingface.co: no route")
    monkeypatch.setattr(hub, "is_cached", lambda model_id: False)
    began = time.monotonic()
    result = CliRunner().invoke(
        cli, ["text-to-audio", "bells", "-o", str(tmp_path / "x.wav"), "--device", "cpu"]
    )
    assert time.monotonic() - began < 5
    assert result.exit_code == 1
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("Error: model 'riffusion/riffusion-model-v1' is not in the")
    assert "unreachable (huggingface.co: no route)" in line and "RIFFUSION_MODEL=tiny" in line
    assert "scheduler_config" not in line


def test_unreachable_hub_with_a_cached_model_loads_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "huggingface.co: no route")
    monkeypatch.setattr(hub, "is_cached", lambda model_id: True)
    note = hub.prepare_hub_model("riffusion/riffusion-model-v1")
    assert note is not None and "using the cached riffusion/riffusion-model-v1" in note
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # tiny and local directories never touch the hub.
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: pytest.fail("probed the hub"))
    assert hub.prepare_hub_model("tiny") is None
