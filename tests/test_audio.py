"""Audio file I/O and editing: formats round-trip, edits behave, bad input is named."""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from riffusion.audio import (
    SILENCE_DBFS,
    SUPPORTED_FORMATS,
    Audio,
    AudioError,
    crossfade_clips,
    encode_audio,
    normalize_loudness,
    read_audio,
    resample,
    rms_dbfs,
    slice_clips,
    to_mono,
    to_stereo,
    write_audio,
)

SR = 44100


def tone(freq: float, duration_s: float, sr: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(duration_s * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def stereo_tone(duration_s: float = 0.5, sr: int = SR) -> Audio:
    # Different content per channel so a channel swap or mixdown would show.
    return Audio(np.stack([tone(440, duration_s, sr), tone(660, duration_s, sr, 0.25)]), sr)


def dominant_frequency(samples: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sr)[np.argmax(spectrum)])


# ------------------------------------------------------------------------- formats

# Worst-case per-sample error after decoding (16-bit PCM: 1 LSB; lossy codecs:
# measured on these tones ~0.002, bound with margin).
CODEC_TOLERANCE = {"wav": 1 / 32768 + 1e-6, "flac": 1 / 32768 + 1e-6, "ogg": 0.05, "mp3": 0.05}


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
@pytest.mark.parametrize("channels", [1, 2])
def test_every_format_reads_back_what_was_written(tmp_path: Path, fmt: str, channels: int) -> None:
    original = stereo_tone(0.5) if channels == 2 else Audio(tone(440, 0.5)[None], SR)
    path = tmp_path / f"clip.{fmt}"
    write_audio(original, path)

    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        decoded = read_audio(source)
        assert decoded.sample_rate == SR
        assert decoded.channels == channels
        # libsndfile writes LAME/Vorbis length info, so even lossy formats decode
        # to exactly the frames written (tolerance 0 frames).
        assert decoded.num_frames == original.num_frames
        error = np.abs(decoded.samples - original.samples)
        # Lossy codecs ring at the edges; judge them on the middle.
        assert np.percentile(error, 99) <= CODEC_TOLERANCE[fmt]
        for channel in range(channels):
            assert dominant_frequency(decoded.samples[channel], SR) == pytest.approx(
                dominant_frequency(original.samples[channel], SR), abs=3
            )


def test_format_detected_from_content_not_suffix(tmp_path: Path) -> None:
    audio = Audio(tone(440, 0.3)[None], SR)
    mislabelled = tmp_path / "really_flac.wav"
    mislabelled.write_bytes(encode_audio(audio, "flac"))
    assert read_audio(mislabelled).num_frames == audio.num_frames


def test_encode_formats_have_their_magic_bytes() -> None:
    audio = Audio(tone(440, 0.2)[None], SR)
    assert encode_audio(audio, "wav")[:4] == b"RIFF"
    assert encode_audio(audio, "FLAC")[:4] == b"fLaC"
    assert encode_audio(audio, "ogg")[:4] == b"OggS"
    mp3 = encode_audio(audio, "mp3")
    assert mp3[:3] == b"ID3" or (mp3[0] == 0xFF and mp3[1] & 0xE0 == 0xE0)


def test_encode_clips_instead_of_wrapping() -> None:
    loud = Audio(np.array([[2.0, -2.0, 0.5]], dtype=np.float32), SR)
    decoded = read_audio(encode_audio(loud, "wav"))
    assert decoded.samples[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert decoded.samples[0, 1] == pytest.approx(-1.0, abs=1e-4)


def test_read_respects_max_duration_and_min_duration() -> None:
    data = encode_audio(Audio(tone(440, 2.0)[None], SR), "wav")
    assert read_audio(data, max_duration_s=2.5).duration_s == pytest.approx(2.0)
    with pytest.raises(AudioError, match=r"too long: 2\.00 s .*limit 1 s"):
        read_audio(data, max_duration_s=1.0)
    with pytest.raises(AudioError, match="too short"):
        read_audio(data, min_duration_s=3.0)


# -------------------------------------------------------------------- bad inputs


def test_empty_bytes_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="empty audio input"):
        read_audio(b"")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty audio file"):
        read_audio(empty)


def test_valid_header_without_samples_is_empty() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((0, 1), np.float32), SR, format="WAV")
    with pytest.raises(AudioError, match="contains no samples"):
        read_audio(buffer.getvalue())


def test_corrupt_bytes_named_as_corrupt(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="corrupt or unrecognised"):
        read_audio(b"this is not audio at all, just some text" * 10)
    # A real header with its body overwritten by garbage.
    wav = bytearray(encode_audio(Audio(tone(440, 0.2)[None], SR), "flac"))
    wav[8:] = b"\x00" * (len(wav) - 8)
    with pytest.raises(AudioError, match="corrupt"):
        read_audio(bytes(wav))


def test_missing_file_named() -> None:
    with pytest.raises(AudioError, match=r"not found: .*nope\.wav"):
        read_audio("/definitely/not/here/nope.wav")


def test_unsupported_container_rejected() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, tone(440, 0.2), SR, format="AIFF")
    with pytest.raises(AudioError, match=r"unsupported audio format .*AIFF.*wav, flac, ogg, mp3"):
        read_audio(buffer.getvalue())


def test_nan_samples_rejected() -> None:
    buffer = io.BytesIO()
    samples = tone(440, 0.1)
    samples[10] = np.nan
    sf.write(buffer, samples, SR, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read_audio(buffer.getvalue())


def test_unsupported_output_formats(tmp_path: Path) -> None:
    audio = Audio(tone(440, 0.1)[None], SR)
    with pytest.raises(AudioError, match="unsupported audio format 'aac'"):
        encode_audio(audio, "aac")
    with pytest.raises(AudioError, match=r"cannot tell the audio format from .*\.aiff"):
        write_audio(audio, tmp_path / "x.aiff")
    with pytest.raises(AudioError, match="MP3 cannot store 96000 Hz"):
        encode_audio(Audio(tone(440, 0.1, 96000)[None], 96000), "mp3")
    with pytest.raises(AudioError, match="empty audio"):
        encode_audio(Audio(np.zeros((1, 0), np.float32), SR), "wav")


@contextmanager
def python_calls() -> Iterator[list[str]]:
    """The names of the Python functions called in this thread meanwhile (C callbacks
    included)."""
    names: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            names.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        yield names
    finally:
        sys.setprofile(None)


def test_libsndfile_reads_and_writes_without_calling_back_into_python(tmp_path: Path) -> None:
    """Each callback from libsndfile must win the GIL back: beside a busy event loop that
    made a clip's MP3 ten times as slow (bench/bench_audio_io.py). ``encode_audio`` and
    reading a path give libsndfile a descriptor or a path, so it never calls back."""
    audio = stereo_tone(0.5)
    with python_calls() as control:  # what a Python file object costs: soundfile's callbacks
        sf.write(io.BytesIO(), audio.samples.T, SR, format="MP3")
    callbacks = {name for name in control if name.startswith("vio_")}
    assert "vio_write" in callbacks
    for fmt in SUPPORTED_FORMATS:
        with python_calls() as calls:
            data = encode_audio(audio, fmt)
        assert callbacks.isdisjoint(calls), fmt
        path = tmp_path / f"clip.{fmt}"
        path.write_bytes(data)
        with python_calls() as calls:
            decoded = read_audio(path)
        assert callbacks.isdisjoint(calls), fmt
        assert decoded.channels == 2 and decoded.num_frames > 0


def test_encoding_falls_back_to_a_temporary_file_without_memfd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    audio = stereo_tone(0.3)
    expected = encode_audio(audio, "flac")

    def refused(*args: Any) -> int:
        raise PermissionError("memfd_create: operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused, raising=False)
    assert encode_audio(audio, "flac") == expected
    monkeypatch.delattr(os, "memfd_create", raising=False)
    assert encode_audio(audio, "flac") == expected


def test_a_path_read_under_another_name_never_shows_the_path(tmp_path: Path) -> None:
    hidden = tmp_path / "server-temp-1234"
    for content, reason in ((b"", "empty audio file"), (b"not audio at all", "corrupt")):
        hidden.write_bytes(content)
        with pytest.raises(AudioError, match=reason) as raised:
            read_audio(hidden, name="the uploaded audio")
        assert "the uploaded audio" in str(raised.value)
        assert "server-temp" not in str(raised.value)
    with pytest.raises(AudioError, match="not found: the uploaded audio"):
        read_audio(tmp_path / "gone", name="the uploaded audio")


def test_audio_shape_validated() -> None:
    with pytest.raises(AudioError, match=r"\(channels, frames\)"):
        Audio(np.zeros(10, np.float32), SR)
    with pytest.raises(AudioError, match="sample rate"):
        Audio(np.zeros((1, 10), np.float32), 0)
    assert Audio(np.zeros((1, 4), np.float64), SR).samples.dtype == np.float32


# ------------------------------------------------------------------------ editing


def test_resample_keeps_pitch_and_duration() -> None:
    audio = Audio(tone(1000, 1.0, 48000)[None], 48000)
    out = resample(audio, SR)
    assert out.sample_rate == SR
    assert out.num_frames == SR
    assert dominant_frequency(out.samples[0], SR) == pytest.approx(1000, abs=2)
    # Amplitude preserved away from the edges (band-limited sinc, well below Nyquist).
    assert np.abs(out.samples[0, 1000:-1000]).max() == pytest.approx(0.5, abs=0.01)


def test_resample_to_same_rate_is_a_copy() -> None:
    audio = Audio(tone(440, 0.1)[None], SR)
    out = resample(audio, SR)
    np.testing.assert_array_equal(out.samples, audio.samples)
    assert out.samples is not audio.samples


def test_mono_and_stereo_conversion() -> None:
    stereo = stereo_tone(0.1)
    mono = to_mono(stereo)
    assert mono.channels == 1
    np.testing.assert_allclose(mono.samples[0], stereo.samples.mean(axis=0), atol=1e-7)
    back = to_stereo(mono)
    assert back.channels == 2
    np.testing.assert_array_equal(back.samples[0], back.samples[1])
    np.testing.assert_array_equal(to_stereo(stereo).samples, stereo.samples)
    surround = Audio(np.arange(4 * 5, dtype=np.float32).reshape(4, 5), SR)
    np.testing.assert_array_equal(to_stereo(surround).samples, surround.samples[:2])


def test_normalize_reaches_target_rms() -> None:
    quiet = Audio(tone(440, 1.0, amplitude=0.01)[None], SR)
    out = normalize_loudness(quiet, target_dbfs=-12.0)
    assert rms_dbfs(out) == pytest.approx(-12.0, abs=0.01)
    assert np.abs(out.samples).max() <= 0.99


def test_normalize_limits_peak() -> None:
    # A click train: RMS is tiny compared with its peak, so reaching -12 dBFS
    # would clip; the peak limit wins.
    clicks = np.zeros(SR, np.float32)
    clicks[::4410] = 0.3
    out = normalize_loudness(Audio(clicks[None], SR), target_dbfs=-12.0, peak=0.99)
    assert np.abs(out.samples).max() == pytest.approx(0.99, abs=1e-6)
    assert rms_dbfs(out) < -12.0


def test_normalize_silence_is_unchanged_and_finite() -> None:
    silent = Audio(np.zeros((2, 1000), np.float32), SR)
    out = normalize_loudness(silent)
    assert np.isfinite(out.samples).all()
    np.testing.assert_array_equal(out.samples, 0)
    assert rms_dbfs(silent) == -math.inf
    # Just under the silence threshold: left alone rather than boosted by ~80 dB.
    floor = Audio(np.full((1, 1000), 10 ** ((SILENCE_DBFS - 1) / 20), np.float32), SR)
    np.testing.assert_array_equal(normalize_loudness(floor).samples, floor.samples)


def test_slice_clips_cover_the_audio_with_overlap() -> None:
    audio = Audio(np.arange(12 * SR, dtype=np.float32)[None] / (12 * SR), SR)
    clips = slice_clips(audio, clip_duration_s=5.12, overlap_s=0.2)
    clip, step = round(5.12 * SR), round(4.92 * SR)
    assert [c.num_frames for c in clips] == [clip, clip, 12 * SR - 2 * step]
    for index, piece in enumerate(clips):
        start = index * step
        np.testing.assert_array_equal(piece.samples, audio.samples[:, start : start + clip])
    # A short input is one clip; the audio is not padded.
    assert [c.num_frames for c in slice_clips(Audio(tone(440, 1.0)[None], SR))] == [SR]


def test_slice_rejects_bad_parameters() -> None:
    audio = Audio(tone(440, 1.0)[None], SR)
    with pytest.raises(AudioError, match="overlap"):
        slice_clips(audio, clip_duration_s=1.0, overlap_s=1.0)
    with pytest.raises(AudioError, match="clip duration"):
        slice_clips(audio, clip_duration_s=0)
    with pytest.raises(AudioError, match="empty"):
        slice_clips(Audio(np.zeros((1, 0), np.float32), SR))


def test_slice_then_linear_crossfade_restores_the_signal() -> None:
    audio = stereo_tone(11.0)
    clips = slice_clips(audio, clip_duration_s=5.12, overlap_s=0.2)
    joined = crossfade_clips(clips, overlap_s=0.2, curve="linear")
    assert joined.num_frames == audio.num_frames
    np.testing.assert_allclose(joined.samples, audio.samples, atol=1e-6)


def test_linear_crossfade_of_constants_has_no_dip_or_bump() -> None:
    a = Audio(np.full((1, SR), 0.5, np.float32), SR)
    b = Audio(np.full((1, SR), 0.5, np.float32), SR)
    joined = crossfade_clips([a, b], overlap_s=0.2, curve="linear")
    assert joined.num_frames == 2 * SR - round(0.2 * SR)
    # Linear gains sum to exactly 1: a constant stays constant (float rounding only).
    np.testing.assert_allclose(joined.samples, 0.5, atol=1e-6)


def test_equal_power_crossfade_bounds() -> None:
    overlap = round(0.2 * SR)
    # Correlated constants: gains sin+cos peak at sqrt(2) mid-fade (+3.01 dB), never dip below 1.
    a = Audio(np.full((1, SR), 0.5, np.float32), SR)
    joined = crossfade_clips([a, a], overlap_s=0.2)
    assert joined.num_frames == 2 * SR - overlap
    assert joined.samples.max() <= 0.5 * math.sqrt(2) + 1e-6
    assert joined.samples.min() >= 0.5 - 1e-6
    # Uncorrelated noise (the case for generated clips): power stays within 0.5 dB.
    rng = np.random.default_rng(0)
    noise = [Audio(rng.normal(0, 0.1, (1, SR)).astype(np.float32), SR) for _ in range(2)]
    joined = crossfade_clips(noise, overlap_s=0.2)
    region = joined.samples[0, SR - overlap : SR]
    level = 20 * np.log10(np.sqrt(np.mean(region**2)) / 0.1)
    assert abs(level) < 0.5
    # The linear fade on the same noise dips (why equal power is the default).
    linear = crossfade_clips(noise, overlap_s=0.2, curve="linear").samples[0, SR - overlap : SR]
    assert 20 * np.log10(np.sqrt(np.mean(linear**2)) / 0.1) < -1.0


def test_crossfade_checks_inputs() -> None:
    with pytest.raises(AudioError, match="no clips"):
        crossfade_clips([])
    a = Audio(np.zeros((1, 100), np.float32), SR)
    b = Audio(np.zeros((2, 100), np.float32), SR)
    with pytest.raises(AudioError, match="clip 1 is 2 ch"):
        crossfade_clips([a, b])
    with pytest.raises(AudioError, match="fade curve"):
        crossfade_clips([a, a], curve="cubic")  # type: ignore[arg-type]
    # A clip shorter than the overlap is faded over its own length.
    short = Audio(np.ones((1, 10), np.float32), SR)
    assert crossfade_clips([a, short], overlap_s=0.2).num_frames == 100
