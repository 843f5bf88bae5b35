"""Audio input hardening: bounded resampling, sample-rate range, streams of unstated length."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import soundfile as sf

from riffusion.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    Audio,
    AudioError,
    read_audio,
    resample,
)
from tests.served_checks import wav_bytes


def _wav(sample_rate: int, seconds: float = 1.0) -> bytes:
    return wav_bytes(seconds, sample_rate, frequency_hz=440)


def _flac_of_unstated_length(samples: np.ndarray, sample_rate: int) -> bytes:
    """A FLAC whose STREAMINFO says 0 samples ("unknown"), as an encoder writing to a pipe does."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="FLAC")
    data = bytearray(buffer.getvalue())
    streaminfo = 8  # after "fLaC" and the metadata block header
    data[streaminfo + 13] &= 0xF0  # total samples: the low 36 bits of bytes 10..17
    data[streaminfo + 14 : streaminfo + 18] = b"\0\0\0\0"
    return bytes(data)


@pytest.mark.parametrize("sample_rate", [4001, 8009, 96_017])
def test_resampling_rates_sharing_no_factor_is_fast(sample_rate: int) -> None:
    """Rates coprime with 44.1 kHz once took gigabytes (a sinc kernel per exact ratio)."""
    audio = read_audio(_wav(sample_rate))
    began = time.perf_counter()
    out = resample(audio, 44100)
    assert time.perf_counter() - began < 2.0
    assert out.sample_rate == 44100
    assert out.num_frames == pytest.approx(44100, abs=2)
    # Still a 440 Hz tone: the strongest FFT bin is at 440 Hz.
    spectrum = np.abs(np.fft.rfft(out.samples[0]))
    assert np.argmax(spectrum) * 44100 / out.num_frames == pytest.approx(440, abs=2)


@pytest.mark.parametrize("sample_rate", [MIN_SAMPLE_RATE - 1, 1000, MAX_SAMPLE_RATE + 1])
def test_sample_rate_outside_the_range_is_refused(sample_rate: int) -> None:
    with pytest.raises(AudioError, match=rf"sample rate {sample_rate} Hz.*between"):
        read_audio(_wav(sample_rate, 0.1))


def test_flac_of_unstated_length_decodes_fully() -> None:
    t = np.arange(44100 * 2) / 44100
    samples = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    payload = _flac_of_unstated_length(samples, 44100)
    assert sf.info(io.BytesIO(payload)).frames > 2**62  # what libsndfile reports
    audio = read_audio(payload, max_duration_s=10)
    assert audio.num_frames == samples.size
    np.testing.assert_allclose(audio.samples[0], samples, atol=1e-4)


def test_flac_of_unstated_length_over_the_limit_stops_early() -> None:
    samples = np.zeros(44100 * 3, dtype=np.float32) + 0.1
    with pytest.raises(AudioError, match=r"too long: over 1 s"):
        read_audio(_flac_of_unstated_length(samples, 44100), max_duration_s=1)


def test_messages_name_the_given_name_not_the_path(tmp_path: object) -> None:
    with pytest.raises(AudioError) as caught:
        read_audio(b"RIFF\x24\x00\x00\x00WAVEfmt garbage", name="the upload")
    assert "the upload" in str(caught.value)
    with pytest.raises(AudioError, match="the upload"):
        read_audio(_wav(44100, 2.0), max_duration_s=1, name="the upload")


def test_resample_keeps_channels_apart() -> None:
    left = np.sin(np.arange(8000) / 5)
    audio = Audio(np.stack([left, np.zeros_like(left)]).astype(np.float32), 8000)
    out = resample(audio, 44100)
    assert out.channels == 2 and np.abs(out.samples[1]).max() < 1e-6
