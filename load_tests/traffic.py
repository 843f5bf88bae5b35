"""The traffic model behind the locustfile, kept free of locust so it can be unit-tested.

- ``AlphaWalk``: the riffusion web app's request sequence (alpha 0 -> 1 in 0.25
  steps, then the old end becomes the new start and a fresh prompt/seed is picked);
- response checks: a generated clip must carry a decodable image, decodable audio
  and a duration that matches what the audio really holds;
- load-shape schedules: ramp, spike and soak as functions of elapsed time.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from load_tests.client import DEFAULT_SEED_IMAGE_ID, WEB_APP_STEPS, prompt_input, web_app_body
from riffusion.api_schemas import decode_data_url as parse_data_url

ALPHA_STEP = 0.25
# MP3 frames pad the decoded length; 80 ms is one 8-pixel latent column of the spectrogram.
DEFAULT_DURATION_TOLERANCE_S = 0.3

PROMPTS = (
    "church bells on sunday",
    "jazz with piano",
    "lo-fi hip hop beat",
    "funky bassline with slap guitar",
    "ambient synth pads at dawn",
    "acoustic folk guitar and harmonica",
    "techno kick with rolling hi-hats",
    "reggae skank with dub delay",
    "cinematic strings, rising tension",
    "bossa nova with soft brushes",
)

IMAGE_FORMATS = ("JPEG", "PNG")


class ResponseCheckError(ValueError):
    """A response that arrived but is not a usable clip; the message is the failure reason."""


@dataclass
class AlphaWalk:
    """The web app's sequence of ``/run_inference/`` bodies for one listener."""

    rng: random.Random
    num_inference_steps: int = WEB_APP_STEPS
    seed_image_id: str = DEFAULT_SEED_IMAGE_ID
    start: dict[str, Any] = field(init=False)
    end: dict[str, Any] = field(init=False)
    alpha: float = field(init=False, default=0.0)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.start = self._new_prompt_input()
        self.end = self._new_prompt_input(avoid=self.start["prompt"])

    def _new_prompt_input(self, avoid: str | None = None) -> dict[str, Any]:
        prompt = self.rng.choice([p for p in PROMPTS if p != avoid])
        return prompt_input(prompt, self.rng.randrange(0, 2**31))

    def next_body(self) -> dict[str, Any]:
        """The next request body: alpha 0, 0.25 ... 1, then 0.25 ... 1 towards a new end."""
        if self._started:
            if self.alpha >= 1.0:
                # Like the web app: the clip just heard (alpha 1) is the new start.
                self.start = self.end
                self.end = self._new_prompt_input(avoid=self.start["prompt"])
                self.alpha = ALPHA_STEP
            else:
                self.alpha = min(1.0, self.alpha + ALPHA_STEP)
        self._started = True
        return web_app_body(
            self.alpha, self.start, self.end, self.num_inference_steps, self.seed_image_id
        )


@dataclass(frozen=True)
class CheckedClip:
    """What a valid clip response held."""

    image_format: str
    image_size: tuple[int, int]
    audio_duration_s: float
    reported_duration_s: float | None


def decode_data_url(value: object, media_type_prefix: str) -> bytes:
    """Bytes of a ``data:<type>;base64,...`` URL whose type starts with ``media_type_prefix``."""
    if not isinstance(value, str) or not value.startswith("data:"):
        raise ResponseCheckError(
            f"expected a data URL for {media_type_prefix}*, got {_kind(value)}"
        )
    try:
        media_type, data = parse_data_url(value)
    except ValueError as error:
        raise ResponseCheckError(str(error)) from error
    if not media_type.startswith(media_type_prefix):
        raise ResponseCheckError(f"data URL has type {media_type!r}, expected {media_type_prefix}*")
    if not data:
        raise ResponseCheckError(f"{media_type}: empty payload")
    return data


def check_image(data: bytes) -> tuple[str, tuple[int, int]]:
    """Format and size of a JPEG/PNG image; raises if it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image_format, size = str(image.format), image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ResponseCheckError(f"image does not decode: {error}") from error
    if image_format not in IMAGE_FORMATS:
        raise ResponseCheckError(f"image is {image_format}, expected JPEG or PNG")
    return image_format, size


def check_audio(data: bytes) -> float:
    """Duration in seconds of decodable audio (MP3, WAV, FLAC, OGG); raises otherwise."""
    try:
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise ResponseCheckError(f"audio does not decode: {error}") from error
    if samples.shape[0] == 0:
        raise ResponseCheckError("audio is empty")
    if not np.isfinite(samples).all():
        raise ResponseCheckError("audio holds NaN or infinite samples")
    return float(samples.shape[0] / sample_rate)


def check_duration(
    measured_s: float, expected_s: float, tolerance_s: float, what: str = "duration"
) -> None:
    if abs(measured_s - expected_s) > tolerance_s:
        raise ResponseCheckError(
            f"{what} mismatch: audio holds {measured_s:.2f} s, expected {expected_s:.2f} s "
            f"(tolerance {tolerance_s:.2f} s)"
        )


def check_clip_payload(
    payload: object,
    *,
    expected_duration_s: float | None = None,
    tolerance_s: float = DEFAULT_DURATION_TOLERANCE_S,
) -> CheckedClip:
    """Validate a web-app style answer ``{image, audio, duration_s}`` (data URLs)."""
    if not isinstance(payload, dict):
        raise ResponseCheckError(f"expected a JSON object, got {_kind(payload)}")
    missing = [key for key in ("image", "audio", "duration_s") if key not in payload]
    if missing:
        raise ResponseCheckError(f"response lacks {', '.join(missing)}")
    reported = payload["duration_s"]
    if not isinstance(reported, int | float) or isinstance(reported, bool) or reported <= 0:
        raise ResponseCheckError(f"duration_s is not a positive number: {reported!r}")
    image_format, size = check_image(decode_data_url(payload["image"], "image/"))
    audio_s = check_audio(decode_data_url(payload["audio"], "audio/"))
    check_duration(audio_s, float(reported), tolerance_s, what="duration_s")
    if expected_duration_s is not None:
        check_duration(audio_s, expected_duration_s, tolerance_s, what="requested duration")
    return CheckedClip(image_format, size, audio_s, float(reported))


def check_audio_file(
    content: bytes,
    content_type: str | None,
    *,
    expected_duration_s: float | None = None,
    declared_duration_s: str | None = None,
    tolerance_s: float = DEFAULT_DURATION_TOLERANCE_S,
) -> float:
    """Validate an audio file answer (text-to-audio, audio-to-audio); returns its duration."""
    if not (content_type or "").startswith("audio/"):
        raise ResponseCheckError(f"content type is {content_type!r}, expected audio/*")
    audio_s = check_audio(content)
    if declared_duration_s is not None:
        try:
            declared = float(declared_duration_s)
        except ValueError as error:
            raise ResponseCheckError(
                f"duration header is not a number: {declared_duration_s!r}"
            ) from error
        check_duration(audio_s, declared, tolerance_s, what="declared duration")
    if expected_duration_s is not None:
        check_duration(audio_s, expected_duration_s, tolerance_s, what="requested duration")
    return audio_s


def check_interpolation_payload(
    payload: object, num_clips: int, tolerance_s: float = DEFAULT_DURATION_TOLERANCE_S
) -> float:
    """Validate ``{audio, format, duration_s, clips: [{alpha, image}]}``; returns the duration."""
    if not isinstance(payload, dict):
        raise ResponseCheckError(f"expected a JSON object, got {_kind(payload)}")
    missing = [key for key in ("audio", "duration_s", "clips") if key not in payload]
    if missing:
        raise ResponseCheckError(f"response lacks {', '.join(missing)}")
    clips = payload["clips"]
    if not isinstance(clips, list) or len(clips) != num_clips:
        count = len(clips) if isinstance(clips, list) else _kind(clips)
        raise ResponseCheckError(f"expected {num_clips} clip images, got {count}")
    alphas = []
    for clip in clips:
        if not isinstance(clip, dict) or "image" not in clip or "alpha" not in clip:
            raise ResponseCheckError("a clip entry lacks its image or alpha")
        check_image(decode_data_url(clip["image"], "image/"))
        alphas.append(clip["alpha"])
    if alphas != sorted(alphas) or alphas[0] != 0 or alphas[-1] != 1:
        raise ResponseCheckError(f"clip alphas do not walk 0 -> 1: {alphas}")
    audio_s = check_audio(decode_data_url(payload["audio"], "audio/"))
    check_duration(audio_s, float(payload["duration_s"]), tolerance_s, what="duration_s")
    return audio_s


def _kind(value: object) -> str:
    if isinstance(value, str):
        return f"string {value[:30]!r}"
    return type(value).__name__


def synth_wav(duration_s: float, sample_rate: int = 44100, seed: int = 0) -> bytes:
    """A short musical WAV (a chord with a beat) for audio-to-audio uploads."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * sample_rate)) / sample_rate
    root = rng.choice([110.0, 130.81, 146.83, 164.81])
    chord = sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1.0, 1.25, 1.5))
    beat = np.exp(-((t * 2.0) % 1.0) * 12.0)  # a decaying pulse twice a second
    signal = 0.25 * chord * (0.4 + 0.6 * beat) + 0.02 * rng.standard_normal(t.shape)
    buffer = io.BytesIO()
    sf.write(buffer, signal.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# --- load-shape schedules (users wanted at an elapsed time; None = test over) ---

SHAPES = ("ramp", "spike", "soak")


def ramp_users(elapsed_s: float, run_time_s: float, users: int, steps: int = 5) -> int | None:
    """Step from users/steps up to ``users`` in even steps: find where latency bends."""
    if elapsed_s >= run_time_s:
        return None
    steps = max(1, min(steps, users))
    step = min(steps - 1, int(elapsed_s / (run_time_s / steps)))
    return max(1, math.ceil(users * (step + 1) / steps))


def spike_users(elapsed_s: float, run_time_s: float, users: int) -> int | None:
    """A quarter of ``users`` as baseline, all of them for the middle fifth, then baseline again."""
    if elapsed_s >= run_time_s:
        return None
    baseline = max(1, users // 4)
    in_spike = 0.4 * run_time_s <= elapsed_s < 0.6 * run_time_s
    return users if in_spike else baseline


def soak_users(elapsed_s: float, run_time_s: float, users: int) -> int | None:
    """Ramp linearly over the first tenth, then hold ``users`` to the end (leaks, drift)."""
    if elapsed_s >= run_time_s:
        return None
    ramp_s = 0.1 * run_time_s
    if elapsed_s >= ramp_s:
        return users
    return max(1, math.ceil(users * elapsed_s / ramp_s))


def shape_users(shape: str, elapsed_s: float, run_time_s: float, users: int) -> int | None:
    schedules = {"ramp": ramp_users, "spike": spike_users, "soak": soak_users}
    if shape not in schedules:
        raise ValueError(f"unknown load shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return schedules[shape](elapsed_s, run_time_s, users)
