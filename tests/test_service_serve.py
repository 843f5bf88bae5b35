"""A real `bentoml serve` (API and model service as separate processes) on 127.0.0.1.

Started once for the module with the tiny model and an API key.
Checks the web app's exact request and response, adaptive batching across
concurrent requests, auth, CORS and the Prometheus metrics on the public port.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from load_tests.client import histogram, metric_total, prompt_input, web_app_body
from load_tests.server import LocalServer
from riffusion.api_schemas import decode_data_url

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY_TIMEOUT_S = 300
STEPS = 2
NUM_CONCURRENT = 4

# The riffusion web app's request, verbatim (its defaults: 50 steps, og_beat, denoising 0.75).
WEB_APP_REQUEST = web_app_body(
    0.75, prompt_input("church bells on sunday", 42), prompt_input("jazz with piano", 123)
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve")
    env = {
        "RIFFUSION_API_KEY": API_KEY,
        "RIFFUSION_BATCHING": "continuous",  # a GPU's default; a CPU's runs clips one by one
        "RIFFUSION_MAX_BATCH_SIZE": "8",
        # CPU clips take seconds: a generous deadline so the dispatcher batches, not refuses.
        "RIFFUSION_MAX_LATENCY_MS": "600000",
        "BENTOML_HOME": str(tmp / "bentoml"),
        "HF_HUB_OFFLINE": "1",
    }
    with LocalServer(tmp / "serve.log", "tiny", env, READY_TIMEOUT_S) as local:
        yield local.url


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
    before = histogram(server, "riffusion_batch_size")

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=300) as client:
            return await asyncio.gather(
                *(client.post("/text_to_audio", json=_text_to_audio_body(s)) for s in seeds)
            )

    together = asyncio.run(fire())
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    after = histogram(server, "riffusion_batch_size")

    # The engine observes the running batch once per denoising step.
    steps = after["_count"] - before.get("_count", 0.0)
    job_steps = after["_sum"] - before.get("_sum", 0.0)
    # Every clip ran all its steps (PNDM's schedule has one more than asked for).
    assert job_steps / NUM_CONCURRENT in (STEPS, STEPS + 1)
    # Fewer UNet forwards than job-steps: concurrent clips shared them.
    assert steps < job_steps
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
        values = histogram(server, name)
        assert values.get("_count", 0) > 0, f"{name} missing or empty"
    # The autoscaling signal (deploy/kubernetes) and the engine's queue and job counters.
    for series in (
        "riffusion_clips_in_flight ",
        "riffusion_engine_waiting_jobs ",
        "riffusion_engine_running_jobs ",
        'riffusion_engine_jobs_total{event="admitted"} ',
        'riffusion_engine_jobs_total{event="completed"} ',
        'riffusion_unet_samples_total{outcome="completed"} ',
        "riffusion_unet_eager_fallbacks_total ",
    ):
        assert any(line.startswith(series) for line in text.splitlines()), series


# --- the engine over HTTP: deadlines, disconnects ------------------------------------------------


def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# Many steps of a short clip: seconds of UNet work, little post-processing.
LONG_CLIP = {"prompt": "endless drone", "num_inference_steps": 150, "duration_s": 0.64}


def test_a_deadline_that_cannot_be_met_is_refused_at_once_with_retry_after(server: str) -> None:
    # Two short clips let the engine measure its step time; 150 steps of a clip
    # cannot then finish in 50 ms.
    for seed in (1, 2):
        warm_up = httpx.post(
            f"{server}/text_to_audio", json=_text_to_audio_body(seed), headers=AUTH, timeout=300
        )
        assert warm_up.status_code == 200
    began = time.monotonic()
    response = httpx.post(
        f"{server}/text_to_audio",
        json=LONG_CLIP,
        headers={**AUTH, "X-Riffusion-Timeout-Seconds": "0.05"},
        timeout=60,
    )
    assert response.status_code == 503, response.text
    assert time.monotonic() - began < 5
    assert int(response.headers["Retry-After"]) >= 1
    assert "cannot finish within" in response.json()["error"]
    assert metric_total(server, "riffusion_engine_jobs_total", {"event": "refused"}) >= 1


def test_a_client_that_disconnects_stops_its_clip_within_a_step(server: str) -> None:
    cancelled_before = metric_total(server, "riffusion_engine_jobs_total", {"event": "cancelled"})
    body = json.dumps(LONG_CLIP).encode()
    request = (
        f"POST /text_to_audio HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(request)
        client.setblocking(False)

        def running() -> bool:
            with contextlib.suppress(BlockingIOError):
                answer = client.recv(4096)
                raise AssertionError(f"answered before it could be abandoned: {answer[:300]!r}")
            return metric_total(server, "riffusion_engine_running_jobs") >= 1

        _wait_for(running, 60, "the clip to run")
        # The client goes away (as the web app's proxy does after 60 s).
    _wait_for(
        lambda: (
            metric_total(server, "riffusion_engine_jobs_total", {"event": "cancelled"})
            > cancelled_before
        ),
        30,
        "the engine to cancel the abandoned clip",
    )
    _wait_for(
        lambda: metric_total(server, "riffusion_clips_in_flight") == 0, 10, "no clip in flight"
    )
    # It stopped far short of its 150 steps (300 UNet samples).
    abandoned = metric_total(server, "riffusion_unet_samples_total", {"outcome": "cancelled"})
    assert 0 < abandoned < 300
