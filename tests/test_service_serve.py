"""A real `bentoml serve` (API and model service as separate processes) on 127.0.0.1.

Started once for the module with the tiny model and an API key; always killed.
Checks the web app's exact request and response, adaptive batching across
concurrent requests, auth, CORS and the Prometheus metrics on the public port.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from load_tests.server import LocalServer
from riffusion.api_schemas import decode_data_url

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY_TIMEOUT_S = 300
STEPS = 2
NUM_CONCURRENT = 4

# The riffusion web app's request, verbatim (DESIGN.md section 5).
WEB_APP_REQUEST = {
    "alpha": 0.75,
    "num_inference_steps": 50,
    "seed_image_id": "og_beat",
    "mask_image_id": None,
    "start": {"prompt": "church bells on sunday", "seed": 42, "denoising": 0.75, "guidance": 7.0},
    "end": {"prompt": "jazz with piano", "seed": 123, "denoising": 0.75, "guidance": 7.0},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    env = {
        "RIFFUSION_API_KEY": API_KEY,
        "RIFFUSION_MAX_BATCH_SIZE": "8",
        # CPU clips take seconds: a generous deadline so the dispatcher batches, not refuses.
        "RIFFUSION_MAX_LATENCY_MS": "600000",
        "BENTOML_HOME": str(tmp / "bentoml"),
        "HF_HUB_OFFLINE": "1",
    }
    with LocalServer(tmp / "serve.log", "tiny", env, READY_TIMEOUT_S) as local:
        yield local.url


def _histogram(base_url: str, name: str) -> dict[str, float]:
    """{le: cumulative count} plus '_count' and '_sum' for one histogram, summed over labels."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = sample.labels["le"]
            else:
                key = sample.name[len(name) :]
            values[key] = values.get(key, 0.0) + sample.value
    return values


def _text_to_audio_body(seed: int) -> dict[str, Any]:
    return {
        "prompt": "lofi beat",
        "seed": seed,
        "num_inference_steps": STEPS,
        "duration_s": 0.64,
        "format": "wav",
    }


def _decode(payload: bytes) -> tuple[np.ndarray, int]:
    samples, sample_rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    return samples, sample_rate


def test_health_and_metrics_need_no_key(server: str) -> None:
    for path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert httpx.get(server + path, timeout=10).status_code == 200, path


def test_api_key_required_elsewhere(server: str) -> None:
    for method, path in (("GET", "/seed_images"), ("POST", "/seed_images"), ("GET", "/docs.json")):
        response = httpx.request(method, server + path, json={}, timeout=10)
        assert response.status_code == 401, path
        assert "authorization" in response.text
        wrong = httpx.request(
            method, server + path, json={}, headers={"Authorization": "Bearer nope"}, timeout=10
        )
        assert wrong.status_code == 401
        assert httpx.request(method, server + path, json={}, headers=AUTH, timeout=10).is_success


def test_cors_preflight_and_response_headers(server: str) -> None:
    origin = {"Origin": "https://app.example"}
    preflight = httpx.options(
        f"{server}/run_inference/",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", origin["Origin"])
    response = httpx.get(f"{server}/seed_images", headers={**AUTH, **origin}, timeout=10)
    assert response.headers["access-control-allow-origin"] in ("*", origin["Origin"])


def test_web_app_request_gets_jpeg_and_mp3_of_stated_duration(server: str) -> None:
    response = httpx.post(
        f"{server}/run_inference/", json=WEB_APP_REQUEST, headers=AUTH, timeout=300
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"image", "audio", "duration_s"}
    media_type, jpeg = decode_data_url(body["image"])
    assert media_type == "image/jpeg"
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (512, 512)
    media_type, mp3 = decode_data_url(body["audio"])
    assert media_type == "audio/mpeg"
    samples, sample_rate = _decode(mp3)
    assert sample_rate == 44100
    assert body["duration_s"] == pytest.approx(5.11, abs=0.02)
    assert samples.shape[0] / sample_rate == pytest.approx(body["duration_s"], abs=0.06)


def test_concurrent_requests_are_batched_and_match_solo_results(server: str) -> None:
    seeds = list(range(100, 100 + NUM_CONCURRENT))
    before = _histogram(server, "riffusion_batch_size")

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=300) as client:
            return await asyncio.gather(
                *(client.post("/text_to_audio", json=_text_to_audio_body(s)) for s in seeds)
            )

    together = asyncio.run(fire())
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    after = _histogram(server, "riffusion_batch_size")

    calls = after["_count"] - before.get("_count", 0.0)
    clips = after["_sum"] - before.get("_sum", 0.0)
    assert clips == NUM_CONCURRENT
    # Fewer model calls than clips: concurrent clips were merged into batches.
    assert calls < NUM_CONCURRENT
    assert max(int(r.headers["X-Riffusion-Batch-Size"]) for r in together) > 1

    # Serve two of them alone (each solo call costs a full clip on CPU).
    for seed, batched in list(zip(seeds, together, strict=True))[:2]:
        alone = httpx.post(
            f"{server}/text_to_audio", json=_text_to_audio_body(seed), headers=AUTH, timeout=300
        )
        assert alone.headers["X-Riffusion-Batch-Size"] == "1"
        batched_samples, _ = _decode(batched.content)
        alone_samples, _ = _decode(alone.content)
        assert batched_samples.shape == alone_samples.shape
        # Same job, same result whatever its batch-mates: batched float sums differ in the
        # last bits, which Griffin-Lim and loudness normalisation carry to ~0.1 % of peak.
        peak = np.abs(alone_samples).max()
        assert np.abs(batched_samples - alone_samples).max() < 0.01 * peak
        correlation = np.corrcoef(batched_samples[:, 0], alone_samples[:, 0])[0, 1]
        assert correlation > 0.999


def test_custom_metrics_on_public_port(server: str) -> None:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for name in (
        "riffusion_batch_size",
        "riffusion_queue_wait_seconds",
        "riffusion_denoise_step_seconds",
        "riffusion_clip_latency_seconds",
    ):
        histogram = _histogram(server, name)
        assert histogram.get("_count", 0) > 0, f"{name} missing or empty"
    # The series the Kubernetes autoscaler's adapter rule reads (deploy/kubernetes).
    assert any(
        line.startswith("bentoml_service_request_in_progress{") and 'endpoint="/generate"' in line
        for line in text.splitlines()
    )
