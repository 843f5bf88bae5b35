"""Audio file I/O and editing on numpy arrays (soundfile; no ffmpeg).

Reading and writing go through libsndfile (WAV, FLAC, OGG/Vorbis and MP3);
resampling uses soxr, whose time and memory stay bounded for any pair of rates
(a sinc resampler built for the exact ratio grows with the rates when they share
no factor). Every problem with the input surfaces as :class:`AudioError` whose
message names it.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import soundfile as sf
import soxr

SUPPORTED_FORMATS = ("wav", "flac", "ogg", "mp3")
DEFAULT_SAMPLE_RATE = 44100

# libsndfile's container names -> ours. WAVEX is WAV with a channel mask.
_FORMAT_FROM_SNDFILE = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}
# (libsndfile format, subtype, compression level) used when encoding.
_ENCODING: dict[str, tuple[str, str, float | None]] = {
    "wav": ("WAV", "PCM_16", None),
    "flac": ("FLAC", "PCM_16", None),
    "ogg": ("OGG", "VORBIS", 0.3),  # Vorbis quality ~0.7 (0 = best, 1 = smallest)
    "mp3": ("MP3", "MPEG_LAYER_III", 0.2),  # VBR, transparent for music at 44.1 kHz
}
_SUFFIX_FORMATS = {".wav": "wav", ".flac": "flac", ".ogg": "ogg", ".oga": "ogg", ".mp3": "mp3"}
# MPEG-1/2/2.5 layer III only defines these rates.
_MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_MAX_CHANNELS = {"mp3": 2}
# Rates accepted on input: below 4 kHz there is no music left to work with; above
# 384 kHz no audio interface records.
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 384_000
# libsndfile reports a length this large (2**63 - 1) for a stream whose header does not
# state it (e.g. a FLAC written to a pipe): such files are decoded block by block.
_UNKNOWN_FRAMES = 2**62
_READ_BLOCK_FRAMES = 1 << 16
# Below this RMS (about -90 dBFS, under 16-bit dither) a signal is treated as
# silence: normalising it would only amplify the noise floor (or divide by zero).
SILENCE_DBFS = -90.0

FadeCurve = Literal["equal_power", "linear"]
AudioSource = str | Path | bytes | bytearray | BinaryIO


class AudioError(ValueError):
    """Audio input that cannot be used; the message names the problem."""


@dataclass
class Audio:
    """A waveform: float32 samples shaped (channels, frames) at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        samples = np.asarray(self.samples, dtype=np.float32)
        if samples.ndim != 2:
            raise AudioError(
                f"audio samples must be shaped (channels, frames), got shape {samples.shape}"
            )
        if samples.shape[0] < 1:
            raise AudioError("audio must have at least one channel")
        if int(self.sample_rate) <= 0:
            raise AudioError(f"sample rate must be positive, got {self.sample_rate}")
        self.samples = samples
        self.sample_rate = int(self.sample_rate)

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.sample_rate


# --------------------------------------------------------------------------- I/O


def _open_source(source: AudioSource, name: str | None) -> tuple[BinaryIO | str, str]:
    """A seekable file object or path for libsndfile, plus a name for messages (``name``
    where given).

    A path goes to libsndfile as it is: it reads the file itself, without the GIL (from
    a file object it calls back into Python for every chunk, as ``_scratch_file`` says).
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise AudioError("empty audio input: no bytes")
        return io.BytesIO(source), name or "audio bytes"
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio file not found: {name or path}")
        if path.stat().st_size == 0:
            raise AudioError(f"empty audio file: {name or path}")
        return str(path), name or str(path)
    name = name or str(getattr(source, "name", "audio stream"))
    if not (hasattr(source, "seekable") and source.seekable()):
        data = source.read()
        if not data:
            raise AudioError(f"empty audio input: {name}")
        return io.BytesIO(data), name
    return source, name


def read_audio(
    source: AudioSource,
    *,
    max_duration_s: float | None = None,
    min_duration_s: float | None = None,
    name: str | None = None,
) -> Audio:
    """Decode WAV, FLAC, OGG or MP3 from a path, bytes or a binary file object.

    Raises AudioError for a missing, empty, corrupt, unsupported, too short
    (``min_duration_s``) or too long (``max_duration_s``) input, or a sample rate
    outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]. ``name`` replaces the file name in
    messages (a server names the upload, not its temporary path).
    """
    handle, name = _open_source(source, name)
    try:
        with sf.SoundFile(handle) as sound:
            fmt = _FORMAT_FROM_SNDFILE.get(sound.format)
            if fmt is None:
                raise AudioError(
                    f"unsupported audio format {sound.format_info!r} in {name}; "
                    f"supported: {', '.join(SUPPORTED_FORMATS)}"
                )
            sample_rate = sound.samplerate
            if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
                raise AudioError(
                    f"unsupported sample rate {sample_rate} Hz in {name}: must be between "
                    f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz"
                )
            max_frames = None if max_duration_s is None else int(max_duration_s * sample_rate)
            if 0 <= sound.frames < _UNKNOWN_FRAMES:
                declared_s = sound.frames / sample_rate
                # Check the header first so a huge file is refused before decoding it.
                if max_duration_s is not None and declared_s > max_duration_s * 1.01:
                    raise AudioError(
                        f"audio too long: {declared_s:.2f} s in {name} (limit {max_duration_s:g} s)"
                    )
                frames_ct = sound.read(dtype="float32", always_2d=True)
            else:
                frames_ct = _read_blocks(sound, max_frames, name, max_duration_s)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, EOFError) as exc:
        # LibsndfileError carries libsndfile's own short reason ("Format not recognised.").
        reason = getattr(exc, "error_string", None) or str(exc)
        raise AudioError(f"corrupt or unrecognised audio data in {name}: {reason}") from exc
    if frames_ct.shape[0] == 0:
        raise AudioError(f"empty audio: {name} contains no samples")
    if not np.isfinite(frames_ct).all():
        raise AudioError(f"corrupt audio: {name} contains NaN or infinite samples")
    audio = Audio(np.ascontiguousarray(frames_ct.T), sample_rate)
    if max_duration_s is not None and audio.duration_s > max_duration_s:
        raise AudioError(
            f"audio too long: {audio.duration_s:.2f} s in {name} (limit {max_duration_s:g} s)"
        )
    if min_duration_s is not None and audio.duration_s < min_duration_s:
        raise AudioError(
            f"audio too short: {audio.duration_s:.3f} s in {name} (need at least "
            f"{min_duration_s:g} s)"
        )
    return audio


def _read_blocks(
    sound: sf.SoundFile, max_frames: int | None, name: str, max_duration_s: float | None
) -> np.ndarray:
    """Decode a stream of unstated length block by block, stopping past ``max_frames``.

    ``SoundFile.read`` seeks to its new position after every read, which libsndfile
    refuses for such streams, so the blocks come from libsndfile's own read call.
    """
    blocks: list[np.ndarray] = []
    total = 0
    while True:
        block = np.empty((_READ_BLOCK_FRAMES, sound.channels), dtype=np.float32)
        pointer = sf._ffi.cast("float *", block.ctypes.data)
        count = int(sf._snd.sf_readf_float(sound._file, pointer, _READ_BLOCK_FRAMES))
        if count <= 0:
            break
        blocks.append(block[:count])
        total += count
        if max_frames is not None and total > max_frames:
            raise AudioError(f"audio too long: over {max_duration_s:g} s in {name}")
    if not blocks:
        return np.zeros((0, sound.channels), dtype=np.float32)
    return np.concatenate(blocks)


def format_for_path(path: str | Path) -> str:
    """The audio format implied by a file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise AudioError(
            f"cannot tell the audio format from {str(path)!r}: use one of "
            f"{', '.join(sorted(_SUFFIX_FORMATS))}"
        )
    return _SUFFIX_FORMATS[suffix]


def _check_format(format: str) -> str:
    fmt = format.lower().lstrip(".")
    if fmt not in SUPPORTED_FORMATS:
        raise AudioError(
            f"unsupported audio format {format!r}; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    return fmt


def encode_audio(audio: Audio, format: str) -> bytes:
    """Encode to an in-memory file of ``format`` (wav/flac: 16-bit PCM; ogg: Vorbis; mp3: VBR)."""
    fmt = _check_format(format)
    if audio.num_frames == 0:
        raise AudioError("cannot encode empty audio (no samples)")
    if fmt == "mp3" and audio.sample_rate not in _MP3_SAMPLE_RATES:
        raise AudioError(
            f"MP3 cannot store {audio.sample_rate} Hz audio; resample to one of "
            f"{', '.join(map(str, _MP3_SAMPLE_RATES))} Hz first"
        )
    max_channels = _MAX_CHANNELS.get(fmt)
    if max_channels is not None and audio.channels > max_channels:
        raise AudioError(f"{fmt} holds at most {max_channels} channels, got {audio.channels}")
    container, subtype, level = _ENCODING[fmt]
    # Integer PCM encoders wrap around instead of clipping: clip here.
    frames_ct = np.clip(audio.samples, -1.0, 1.0).T
    with _scratch_file() as scratch:
        try:
            sf.write(
                scratch.fileno(),
                frames_ct,
                audio.sample_rate,
                format=container,
                subtype=subtype,
                compression_level=level,
                closefd=False,
            )
        except (sf.SoundFileError, RuntimeError) as exc:
            raise AudioError(f"could not encode {fmt}: {exc}") from exc
        scratch.seek(0)
        return scratch.read()


def _scratch_file() -> BinaryIO:
    """An anonymous file for libsndfile to write on its own, by descriptor: in memory
    (``memfd_create``) where the system has it, else a temporary file.

    Given a Python file object (``io.BytesIO``), libsndfile calls back into Python for
    every chunk it writes, and each call must win the GIL back from whatever thread
    holds it: beside a busy event loop, a 5 s MP3 took ten times as long
    (bench/bench_audio_io.py). On a descriptor the whole encoding runs without the GIL.
    """
    if hasattr(os, "memfd_create"):
        try:
            return os.fdopen(os.memfd_create("riffusion-audio", os.MFD_CLOEXEC), "w+b")
        except OSError:  # a sandbox that forbids the call
            pass
    return tempfile.TemporaryFile()


def write_audio(audio: Audio, path: str | Path, format: str | None = None) -> None:
    """Write ``audio`` to ``path``; the format comes from the suffix unless given."""
    fmt = _check_format(format) if format is not None else format_for_path(path)
    Path(path).write_bytes(encode_audio(audio, fmt))


# ----------------------------------------------------------------------- editing


def resample(audio: Audio, sample_rate: int = DEFAULT_SAMPLE_RATE) -> Audio:
    """Band-limited resampling to ``sample_rate`` (soxr, high quality).

    Memory and time are proportional to the audio's length whatever the two rates.
    """
    if sample_rate <= 0:
        raise AudioError(f"target sample rate must be positive, got {sample_rate}")
    if sample_rate == audio.sample_rate:
        return Audio(audio.samples.copy(), audio.sample_rate)
    resampled = soxr.resample(audio.samples.T, audio.sample_rate, sample_rate, quality="HQ")
    return Audio(np.ascontiguousarray(resampled.T), sample_rate)


def to_mono(audio: Audio) -> Audio:
    """Average all channels into one."""
    return Audio(audio.samples.mean(axis=0, keepdims=True), audio.sample_rate)


def to_stereo(audio: Audio) -> Audio:
    """Mono is duplicated; stereo is kept; more channels keep front left/right (WAV order)."""
    if audio.channels == 1:
        return Audio(np.repeat(audio.samples, 2, axis=0), audio.sample_rate)
    return Audio(audio.samples[:2].copy(), audio.sample_rate)


def rms_dbfs(audio: Audio) -> float:
    """RMS level over all channels in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(audio.samples, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def normalize_loudness(audio: Audio, target_dbfs: float = -12.0, peak: float = 0.99) -> Audio:
    """Scale to ``target_dbfs`` RMS, lowering the gain if the peak would pass ``peak``.

    A single gain is applied (no compression), so the waveform's shape is kept;
    a very peaky signal ends up quieter than the target rather than distorted.
    Silence (below ``SILENCE_DBFS``) is returned unchanged.
    """
    if not 0.0 < peak <= 1.0:
        raise AudioError(f"peak must be in (0, 1], got {peak}")
    level_dbfs = rms_dbfs(audio) if audio.num_frames else -math.inf
    if level_dbfs < SILENCE_DBFS:
        return Audio(audio.samples.copy(), audio.sample_rate)
    gain = 10.0 ** ((target_dbfs - level_dbfs) / 20.0)
    max_abs = float(np.max(np.abs(audio.samples)))
    gain = min(gain, peak / max_abs)
    return Audio(audio.samples * np.float32(gain), audio.sample_rate)


def _frames(seconds: float, sample_rate: int) -> int:
    return round(seconds * sample_rate)


def slice_clips(audio: Audio, clip_duration_s: float = 5.12, overlap_s: float = 0.2) -> list[Audio]:
    """Cut into clips of ``clip_duration_s`` that overlap by ``overlap_s``.

    Clips start every ``clip_duration_s - overlap_s``; the last one ends at the
    end of the audio and may be shorter. ``crossfade_clips`` with the same
    overlap puts them back together at the original length.
    """
    clip = _frames(clip_duration_s, audio.sample_rate)
    overlap = _frames(overlap_s, audio.sample_rate)
    if clip <= 0:
        raise AudioError(f"clip duration must be positive, got {clip_duration_s} s")
    if not 0 <= overlap < clip:
        raise AudioError(
            f"overlap must be >= 0 and shorter than the clip, got {overlap_s} s "
            f"for {clip_duration_s} s clips"
        )
    if audio.num_frames == 0:
        raise AudioError("cannot slice empty audio")
    clips = []
    start = 0
    while True:
        end = min(start + clip, audio.num_frames)
        clips.append(Audio(audio.samples[:, start:end].copy(), audio.sample_rate))
        if end >= audio.num_frames:
            return clips
        start += clip - overlap


def fade_curves(length: int, curve: FadeCurve = "equal_power") -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in) gains of ``length`` samples, sampled at sample centres."""
    position = (np.arange(length, dtype=np.float64) + 0.5) / max(length, 1)
    if curve == "linear":
        fade_in = position
        fade_out = 1.0 - position
    elif curve == "equal_power":
        fade_in = np.sin(0.5 * np.pi * position)
        fade_out = np.cos(0.5 * np.pi * position)
    else:
        raise AudioError(f"unknown fade curve {curve!r}; use 'equal_power' or 'linear'")
    return fade_out.astype(np.float32), fade_in.astype(np.float32)


def crossfade_clips(
    clips: Sequence[Audio], overlap_s: float = 0.2, curve: FadeCurve = "equal_power"
) -> Audio:
    """Join clips, crossfading each pair over ``overlap_s`` (the tail of one, head of the next).

    Equal-power (sin/cos) is the default because generated clips have
    unrelated phases in the overlap: their powers add, so sin²+cos² = 1 keeps
    the level steady where a linear fade would dip by up to 3 dB. Use
    ``curve="linear"`` for identical/correlated material (gains sum to 1).
    The result has ``sum(lengths) - (n - 1) * overlap`` samples.
    """
    if not clips:
        raise AudioError("no clips to join")
    sample_rate, channels = clips[0].sample_rate, clips[0].channels
    for index, clip in enumerate(clips):
        if clip.sample_rate != sample_rate or clip.channels != channels:
            raise AudioError(
                f"clip {index} is {clip.channels} ch at {clip.sample_rate} Hz, expected "
                f"{channels} ch at {sample_rate} Hz"
            )
    overlap = _frames(overlap_s, sample_rate)
    if overlap < 0:
        raise AudioError(f"overlap must be >= 0, got {overlap_s} s")
    out = clips[0].samples.copy()
    for clip in clips[1:]:
        # A clip shorter than the overlap is crossfaded over its whole length.
        length = min(overlap, out.shape[1], clip.num_frames)
        fade_out, fade_in = fade_curves(length, curve)
        head = clip.samples[:, :length]
        mixed = out[:, out.shape[1] - length :] * fade_out + head * fade_in
        out = np.concatenate([out[:, : out.shape[1] - length], mixed, clip.samples[:, length:]], 1)
    return Audio(out, sample_rate)
