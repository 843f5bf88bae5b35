"""The audio subcommands of ``riffusion`` end to end on files in a temp dir."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from riffusion.audio import Audio, read_audio, rms_dbfs, write_audio
from riffusion.cli import cli
from riffusion.seed_images import SEED_IMAGES_DIR

SR = 44100
COMMANDS = (
    "audio-to-image",
    "image-to-audio",
    "print-exif",
    "sample-clips",
    "audio-to-images",
    "make-seed-images",
    "seed-images",
)


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def chord(duration_s: float, sr: int = SR, channels: int = 1) -> Audio:
    t = np.arange(round(duration_s * sr)) / sr
    mono = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (220, 277.2, 329.6))
    samples = np.stack([mono, 0.5 * mono][:channels]).astype(np.float32)
    return Audio(samples, sr)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_help_lists_every_command_in_a_real_subprocess() -> None:
    executable = shutil.which("riffusion") or str(Path(sys.executable).parent / "riffusion")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    for command in COMMANDS:
        help_result = run(command, "--help")
        assert help_result.exit_code == 0
        assert "Usage:" in help_result.output


def test_audio_to_image_and_back(tmp_path: Path) -> None:
    # 48 kHz stereo MP3 in: resampled to 44.1 kHz, stereo spectrogram out.
    source = tmp_path / "chord.mp3"
    write_audio(chord(0.6, sr=48000, channels=2), source)
    image_path = tmp_path / "out" / "chord.png"
    result = run("audio-to-image", source, image_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    image = Image.open(image_path)
    assert image.height == 512
    assert abs(image.width - 61) <= 1  # one column per 10 ms
    pixels = np.asarray(image)
    assert (pixels[..., 0] == 0).all()  # stereo: R = 0
    assert pixels[..., 1].min() < pixels[..., 2].min()  # the louder left channel is darker in G
    assert image.getexif()[11005] == 1

    exif = run("print-exif", image_path)
    assert exif.exit_code == 0
    assert "44100" in exif.output and "stereo" in exif.output

    wav = tmp_path / "back.wav"
    result = run("image-to-audio", image_path, wav, "--device", "cpu", "--seed", "3")
    assert result.exit_code == 0, result.output
    audio = read_audio(wav)
    assert audio.sample_rate == SR and audio.channels == 2
    assert abs(audio.duration_s - 0.6) <= 0.011  # within one hop (plus resampling rounding)
    assert rms_dbfs(audio) == pytest.approx(-12.0, abs=0.5)


def test_long_conversions_show_their_progress(tmp_path: Path) -> None:
    """Each stage on a bar, and Griffin-Lim's iterations counted as they run."""
    source = tmp_path / "chord.wav"
    write_audio(chord(0.6), source)
    image_path = tmp_path / "chord.png"
    forward = run("audio-to-image", source, image_path, "--device", "cpu")
    assert forward.exit_code == 0, forward.output
    assert "spectrogram" in forward.output and "3/3" in forward.output, forward.output
    back = run("image-to-audio", image_path, tmp_path / "back.wav", "--device", "cpu")
    assert back.exit_code == 0, back.output
    assert "writing the audio" in back.output and "3/3" in back.output, back.output
    assert "griffin-lim" in back.output and "32/32" in back.output, back.output


def test_mono_option_and_error_paths(tmp_path: Path) -> None:
    source = tmp_path / "stereo.flac"
    write_audio(chord(0.4, channels=2), source)
    assert (
        run("audio-to-image", source, tmp_path / "m.png", "--mono", "--device", "cpu").exit_code
        == 0
    )
    mono = np.asarray(Image.open(tmp_path / "m.png"))
    assert (mono[..., 0] == mono[..., 1]).all() and (mono[..., 1] == mono[..., 2]).all()

    assert_one_line_error(
        run("audio-to-image", tmp_path / "nope.wav", tmp_path / "x.png"), "not found"
    )
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio" * 100)
    assert_one_line_error(run("audio-to-image", garbage, tmp_path / "x.png"), "corrupt")
    tiny = tmp_path / "tiny.wav"
    write_audio(chord(0.05), tiny)
    assert_one_line_error(run("audio-to-image", tiny, tmp_path / "x.png"), "too short")
    assert_one_line_error(
        run("audio-to-image", source, tmp_path / "x.png", "--max-duration", "0.3"), "too long"
    )
    not_image = tmp_path / "not_image.png"
    not_image.write_text("hello")
    assert_one_line_error(
        run("image-to-audio", not_image, tmp_path / "y.wav"), "not a readable image"
    )
    assert_one_line_error(run("print-exif", not_image), "not a readable image")
    assert_one_line_error(run("image-to-audio", tmp_path / "m.png", tmp_path / "y.aiff"), "aiff")
    bad_device = run("audio-to-image", source, tmp_path / "x.png", "--device", "banana")
    assert bad_device.exit_code == 2 and "not a torch device" in bad_device.output


def test_print_exif_without_tags(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = run("print-exif", plain)
    assert result.exit_code == 0
    assert "(missing)" in result.output and "no spectrogram EXIF tags" in result.output


@pytest.mark.parametrize("mode", ["random", "even"])
def test_sample_clips(tmp_path: Path, mode: str) -> None:
    # A ramp makes each clip's content reveal where it was cut from.
    ramp = Audio((np.arange(3 * SR, dtype=np.float32) / (3 * SR))[None], SR)
    source = tmp_path / "long.wav"
    write_audio(ramp, source)
    out = tmp_path / "clips"
    result = run(
        "sample-clips", source, out, "--num-clips", "3", "--duration", "0.5", "--mode", mode
    )
    assert result.exit_code == 0, result.output
    clips = sorted(out.glob("*.wav"))
    assert len(clips) == 3
    starts = []
    for path in clips:
        clip = read_audio(path)
        assert clip.num_frames == round(0.5 * SR)
        start = float(path.stem.rsplit("_", 1)[1].rstrip("s"))
        starts.append(start)
        # File names carry the start rounded to 10 ms: 0.005 s / 3 s of ramp.
        assert clip.samples[0, 0] == pytest.approx(start / 3, abs=0.002)
    if mode == "even":
        assert starts == pytest.approx([0.0, 1.25, 2.5], abs=0.01)
    assert_one_line_error(run("sample-clips", source, out, "--duration", "10"), "do not fit")


def test_audio_to_images_skips_bad_files(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_audio(chord(0.4), inputs / "a.wav")
    write_audio(chord(0.4, channels=2), inputs / "b.ogg")
    (inputs / "broken.mp3").write_bytes(b"\x00" * 500)
    (inputs / "notes.txt").write_text("ignored: not an audio suffix")
    outputs = tmp_path / "out"
    result = run("audio-to-images", inputs, outputs, "--device", "cpu")
    assert result.exit_code == 1
    assert sorted(p.name for p in outputs.iterdir()) == ["a.png", "b.png"]
    assert "broken.mp3" in result.output
    assert "converted 2 of 3 files" in result.output
    assert_one_line_error(result, "1 file(s) failed", "broken.mp3")

    (inputs / "broken.mp3").unlink()
    assert run("audio-to-images", inputs, outputs, "--device", "cpu").exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("audio-to-images", empty, outputs), "no audio files")


def test_seed_image_commands(tmp_path: Path) -> None:
    listing = run("seed-images")
    assert listing.exit_code == 0
    assert "og_beat" in listing.output and "93.75" in listing.output
    masks = run("seed-images", "--kind", "mask")
    assert "mask_top_third" in masks.output and "breakbeat" not in masks.output
    assert_one_line_error(run("seed-images", "--dir", tmp_path), "no manifest.json and no <id>.png")

    generated = tmp_path / "lib"
    result = run("make-seed-images", generated)
    assert result.exit_code == 0, result.output
    assert "10 seed and 11 mask images" in result.output
    # Same recipe as the committed library (byte-level checks live in test_seed_images).
    assert (generated / "manifest.json").read_bytes() == (
        SEED_IMAGES_DIR / "manifest.json"
    ).read_bytes()
    assert "og_beat" in run("seed-images", "--dir", generated).output
