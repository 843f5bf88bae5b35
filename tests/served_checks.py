"""What the served-instance tests of one subject share: the limited instance's settings
and the checks of an answer's error shape (tests/test_serve_lifecycle.py,
tests/test_serve_requests.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

API_KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_UPLOAD_MB = 0.25
MAX_CONCURRENCY = 4
STEPS = 2
LIVENESS_GRACE_S = 20.0
HEADER_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 64


def limited_env(tmp: Path) -> dict[str, str | None]:
    """A tiny-model instance with an API key and small limits."""
    return {
        "RIFFUSION_API_KEY": API_KEY,
        # Clips share steps (a GPU's default), which the isolation and cancellation
        # checks need: a CPU's default runs one clip at a time.
        "RIFFUSION_BATCHING": "continuous",
        "RIFFUSION_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "RIFFUSION_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "RIFFUSION_MAX_BATCH_SIZE": "8",
        "RIFFUSION_MAX_LATENCY_MS": "600000",
        "RIFFUSION_LIVENESS_GRACE_S": str(LIVENESS_GRACE_S),
        "RIFFUSION_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "RIFFUSION_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "BENTOML_HOME": str(tmp / "bentoml"),
        "HF_HUB_OFFLINE": "1",
    }


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error body, checked against the one documented shape."""
    return error_shaped(response.json())


def error_shaped(body: Any) -> dict[str, Any]:
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"]
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"}, item
    return dict(body)


def fields_of(response: httpx.Response) -> set[str]:
    return {str(part) for item in error_of(response)["detail"] for part in item["loc"]}


def clip_body(seed: int, **overrides: Any) -> dict[str, Any]:
    body = {"prompt": "lofi beat", "seed": seed, "num_inference_steps": STEPS, "duration_s": 0.64}
    return {**body, "format": "wav", **overrides}


def wav_bytes(seconds: float = 0.5, sample_rate: int = 44100, frequency_hz: float = 220) -> bytes:
    """A 16-bit WAV of a sine tone."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    buffer = io.BytesIO()
    sf.write(
        buffer,
        (0.3 * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32),
        sample_rate,
        "PCM_16",
        format="WAV",
    )
    return buffer.getvalue()
