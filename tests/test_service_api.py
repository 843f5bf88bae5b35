"""Every endpoint of the public service through its ASGI app, in-process, on the tiny model.

Both services run in this process (``bentoml.depends`` resolves to a local
``RiffusionModel`` when no remote mapping exists). To keep Griffin-Lim cheap
on CPU the seed-image library is the project's own, cropped to 64 px (0.64 s)
wide. Adaptive batching across processes is covered by test_service_serve.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from load_tests.client import prompt_input, web_app_body

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
CLIP_PX = 64  # seed images cropped to this width: 0.64 s clips
MAX_UPLOAD_MB = 0.25
MAX_UPLOAD_SECONDS = 3.0
MAX_CONCURRENCY = 3

WEB_APP_REQUEST = web_app_body(
    0.75, prompt_input("church bells on sunday", 42), prompt_input("jazz with piano", 123), STEPS
)


def make_small_library(directory: Path, width: int = CLIP_PX) -> None:
    """The project's seed images cropped to ``width`` px (EXIF kept), same manifest."""
    manifest = json.loads((ROOT / "seed_images" / "manifest.json").read_text())
    directory.mkdir(parents=True, exist_ok=True)
    for entry in manifest["images"]:
        image = Image.open(ROOT / "seed_images" / entry["file"])
        exif = image.getexif()
        image.crop((0, 0, width, image.height)).save(directory / entry["file"], exif=exif)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from starlette.testclient import TestClient

    library = tmp_path_factory.mktemp("seed_images")
    make_small_library(library)
    env = {
        "RIFFUSION_MODEL": "tiny",
        "RIFFUSION_SEED_IMAGES_DIR": str(library),
        "RIFFUSION_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "RIFFUSION_MAX_UPLOAD_SECONDS": str(MAX_UPLOAD_SECONDS),
        "RIFFUSION_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    try:
        assert "service" not in sys.modules, "service.py must be imported with the test env"
        import service

        api_service: Any = service.Riffusion  # a bentoml.Service at runtime
        with TestClient(api_service.to_asgi()) as test_client:
            yield test_client
    finally:
        sys.path.remove(str(ROOT))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(library, ignore_errors=True)


def decode_audio(payload: bytes) -> tuple[np.ndarray, int]:
    samples, sample_rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    return samples, sample_rate


def error_text(response: Any) -> str:
    """The whole error body as text: message and structured locations."""
    return json.dumps(response.json())


def tone_wav(seconds: float, sample_rate: int = 44100) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def text_to_audio(client: Any, **overrides: Any) -> Any:
    body = {"prompt": "lofi beat", "seed": 3, "num_inference_steps": STEPS, "duration_s": 0.64}
    return client.post("/text_to_audio", json={**body, **overrides})


# ------------------------------------------------------------------ health


def test_health_routes(client: Any) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert client.get(path).status_code == 200, path


def test_model_info_reports_the_tiny_model(client: Any) -> None:
    response = client.get("/model_info")
    assert response.status_code == 200
    info = response.json()
    assert info["model_id"] == "tiny" and info["is_tiny"] is True
    assert "TINY" in info["note"]
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["unet_backend"] == "eager"
    assert info["warm_up_s"] > 0  # one generation ran before the service took requests
    # A step measured before ready, at one job (the CPU's batch: batching off).
    assert set(info["step_calibration_ms"]) == {"1"} and info["step_calibration_ms"]["1"] > 0


def test_openapi_documents_typed_endpoints(client: Any) -> None:
    spec = client.get("/docs.json").json()
    for path in ("/run_inference/", "/text_to_audio", "/audio_to_audio", "/interpolate"):
        assert path in spec["paths"], path
    text = json.dumps(spec)
    assert "church bells on sunday" in text  # the web app example
    assert "Interpolation position" in text  # field descriptions reach the docs


# ------------------------------------------------------------- seed images


def test_seed_images_listing(client: Any) -> None:
    listing = client.get("/seed_images").json()["seed_images"]
    by_id = {item["id"]: item for item in listing}
    assert by_id["og_beat"]["kind"] == "seed"
    assert by_id["og_beat"]["tempo_bpm"] > 0 and by_id["og_beat"]["description"]
    assert {"seed", "mask"} == {item["kind"] for item in listing}

    masks = client.get("/seed_images", params={"kind": "mask"}).json()["seed_images"]
    assert masks and all(item["kind"] == "mask" for item in masks)
    # The typed POST form answers the same.
    posted = client.post("/seed_images", json={"kind": "mask"}).json()["seed_images"]
    assert posted == masks

    bad = client.get("/seed_images", params={"kind": "drums"})
    assert bad.status_code == 400 and "kind" in error_text(bad)


# ---------------------------------------------------------------- web app


def test_run_inference_web_app_contract(client: Any) -> None:
    response = client.post("/run_inference/", json=WEB_APP_REQUEST)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"image", "audio", "duration_s"}
    assert body["image"].startswith("data:image/jpeg;base64,")
    assert body["audio"].startswith("data:audio/mpeg;base64,")

    from riffusion.api_schemas import decode_data_url

    _, jpeg = decode_data_url(body["image"])
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (CLIP_PX, 512)
    _, mp3 = decode_data_url(body["audio"])
    samples, sample_rate = decode_audio(mp3)
    assert sample_rate == 44100
    assert body["duration_s"] == pytest.approx(samples.shape[0] / sample_rate, abs=0.06)
    assert body["duration_s"] == pytest.approx(CLIP_PX / 100, abs=0.02)
    assert np.abs(samples).max() > 0.01  # not silence
    assert float(response.headers["X-Riffusion-Pipeline-Seconds"]) > 0


def test_run_inference_optional_fields_default(client: Any) -> None:
    """Only a start prompt: end, alpha, steps' defaults, negative prompt etc. are filled in."""
    minimal = {"start": {"prompt": "calm piano"}, "num_inference_steps": STEPS}
    response = client.post("/run_inference/", json=minimal)
    assert response.status_code == 200, response.text
    assert response.json()["duration_s"] == pytest.approx(CLIP_PX / 100, abs=0.02)


# ----------------------------------------------------------- text to audio


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    # flac: see test_text_to_audio_lossless_formats_agree and test_audio_to_audio_upload.
    [("wav", "audio/wav"), ("ogg", "audio/ogg"), ("mp3", "audio/mpeg")],
)
def test_text_to_audio_formats(client: Any, fmt: str, media_type: str) -> None:
    response = text_to_audio(client, format=fmt, duration_s=0.8)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert f".{fmt}" in response.headers["content-disposition"]
    samples, sample_rate = decode_audio(response.content)
    assert sample_rate == 44100
    assert samples.shape[0] / sample_rate == pytest.approx(0.8, abs=0.06)
    assert np.abs(samples).max() > 0.01


def test_text_to_audio_lossless_formats_agree(client: Any) -> None:
    """Same job, two lossless containers: the same samples (the format only changes encoding)."""
    wav, _ = decode_audio(text_to_audio(client, format="wav").content)
    flac, _ = decode_audio(text_to_audio(client, format="flac").content)
    # Both are 16-bit; the encoders may round a sample differently by one step.
    np.testing.assert_allclose(wav, flac, rtol=0, atol=1.5 / 32768)


# ---------------------------------------------------------- audio to audio


def test_audio_to_audio_upload(client: Any) -> None:
    upload = tone_wav(1.5)
    response = client.post(
        "/audio_to_audio",
        files={"audio": ("tone.wav", upload, "audio/wav")},
        data={
            "prompt": "acoustic guitar",
            "end_prompt": "synth pad",
            "num_inference_steps": str(STEPS),
            "format": "flac",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/flac"
    samples, sample_rate = decode_audio(response.content)
    # Stitched back to the source track's length.
    assert samples.shape[0] / sample_rate == pytest.approx(1.5, abs=0.05)
    assert int(response.headers["X-Riffusion-Clips"]) == 1


# ------------------------------------------------------------- interpolate


def test_interpolate_stitches_clips(client: Any) -> None:
    response = client.post(
        "/interpolate",
        json={
            "start": {"prompt": "church bells", "seed": 1},
            "end": {"prompt": "jazz piano", "seed": 2},
            "num_clips": 2,
            "num_inference_steps": STEPS,
            "seed_image_id": "og_beat",
            "mask_image_id": "mask_left_half",
            "format": "wav",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [clip["alpha"] for clip in body["clips"]] == [0.0, 1.0]

    from riffusion.api_schemas import decode_data_url

    for clip in body["clips"]:
        media_type, png = decode_data_url(clip["image"])
        assert media_type == "image/png"
        assert Image.open(io.BytesIO(png)).size == (CLIP_PX, 512)
    media_type, wav = decode_data_url(body["audio"])
    assert media_type == "audio/wav"
    samples, sample_rate = decode_audio(wav)
    assert samples.shape[0] / sample_rate == pytest.approx(body["duration_s"], abs=0.01)
    # Two 0.64 s clips crossfaded over 0.2 s.
    assert body["duration_s"] == pytest.approx(2 * 0.64 - 0.2, abs=0.03)


# ------------------------------------------------------------- bad input

BAD_JSON_CASES = [
    ("/run_inference/", {**WEB_APP_REQUEST, "seed_image_id": "no_such_seed"}, "seed_image_id"),
    ("/run_inference/", {**WEB_APP_REQUEST, "seed_image_id": "../../etc/passwd"}, "seed_image_id"),
    ("/run_inference/", {**WEB_APP_REQUEST, "seed_image_id": "mask_left_half"}, "seed_image_id"),
    ("/run_inference/", {**WEB_APP_REQUEST, "mask_image_id": "no_such_mask"}, "mask_image_id"),
    ("/run_inference/", {**WEB_APP_REQUEST, "mask_image_id": "og_beat"}, "mask_image_id"),
    ("/run_inference/", {**WEB_APP_REQUEST, "num_inference_steps": 0}, "num_inference_steps"),
    ("/run_inference/", {**WEB_APP_REQUEST, "num_inference_steps": 5000}, "num_inference_steps"),
    ("/run_inference/", {**WEB_APP_REQUEST, "alpha": 1.5}, "alpha"),
    (
        "/run_inference/",
        {**WEB_APP_REQUEST, "start": {**WEB_APP_REQUEST["start"], "denoising": -0.1}},  # type: ignore[dict-item]
        "denoising",
    ),
    (
        "/run_inference/",
        {**WEB_APP_REQUEST, "end": {**WEB_APP_REQUEST["end"], "guidance": 99}},  # type: ignore[dict-item]
        "guidance",
    ),
    ("/run_inference/", {**WEB_APP_REQUEST, "start": {"prompt": ""}}, "prompt"),
    ("/run_inference/", {**WEB_APP_REQUEST, "start": {"prompt": "   "}}, "prompt"),
    ("/run_inference/", {**WEB_APP_REQUEST, "start": {"prompt": "x" * 1001}}, "prompt"),
    ("/run_inference/", {**WEB_APP_REQUEST, "num_inference_step": 5}, "num_inference_step"),
    ("/run_inference/", {"alpha": 0.5}, "start"),
    ("/text_to_audio", {"prompt": "beat", "duration_s": 100}, "duration_s"),
    ("/text_to_audio", {"prompt": "beat", "duration_s": 0.1}, "duration_s"),
    ("/text_to_audio", {"prompt": "beat", "format": "aiff"}, "format"),
    ("/text_to_audio", {"prompt": "beat", "seed": -1}, "seed"),
    (
        "/interpolate",
        {"start": {"prompt": "a"}, "end": {"prompt": "b"}, "num_clips": 99},
        "num_clips",
    ),
    (
        "/interpolate",
        {"start": {"prompt": "a"}, "end": {"prompt": "b"}, "seed_image_id": "nope"},
        "seed_image_id",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_JSON_CASES)
def test_bad_json_request_names_the_field(client: Any, path: str, body: Any, field: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert field in error_text(response)


def test_malformed_json_body(client: Any) -> None:
    response = client.post(
        "/run_inference/",
        content=b'{"alpha": 0.5, "start": {"prompt": ',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "json" in error_text(response).lower()


def _upload(client: Any, payload: bytes, name: str = "track.wav") -> Any:
    return client.post(
        "/audio_to_audio",
        files={"audio": (name, payload, "application/octet-stream")},
        data={"prompt": "guitar", "num_inference_steps": str(STEPS)},
    )


@pytest.mark.parametrize(
    ("payload", "name", "status", "needle"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt garbage-garbage-garbage", "bad.wav", 400, "corrupt"),
        (b"", "empty.wav", 400, "audio"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image.png", 400, "audio"),
        (b"\x00" * int(MAX_UPLOAD_MB * 2**20 * 1.5), "huge.wav", 413, "limit"),
    ],
    ids=["corrupt", "empty", "not-audio", "over-size"],
)
def test_bad_upload(client: Any, payload: bytes, name: str, status: int, needle: str) -> None:
    response = _upload(client, payload, name)
    assert response.status_code == status, response.text
    text = error_text(response)
    assert "audio" in text and needle in text


def test_upload_over_duration_limit(client: Any) -> None:
    # Small in bytes (8 kHz) but longer than the duration limit.
    t = np.arange(int(8000 * (MAX_UPLOAD_SECONDS + 1))) / 8000
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 8000, format="WAV")
    assert len(buffer.getvalue()) < MAX_UPLOAD_MB * 2**20
    response = _upload(client, buffer.getvalue())
    assert response.status_code == 413, response.text
    assert "audio" in error_text(response) and "too long" in error_text(response)


def test_upload_missing_prompt(client: Any) -> None:
    response = client.post(
        "/audio_to_audio", files={"audio": ("tone.wav", tone_wav(0.5), "audio/wav")}, data={}
    )
    assert response.status_code == 400 and "prompt" in error_text(response)


# ---------------------------------------------------------------- overload


def test_overload_answers_429_quickly_and_service_recovers(client: Any) -> None:
    """Beyond max_concurrency in-flight requests, extra ones are refused at once."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def call() -> None:
        began = time.perf_counter()
        status = text_to_audio(client, format="wav", seed=11).status_code
        with lock:
            results.append((status, time.perf_counter() - began))

    threads = [threading.Thread(target=call) for _ in range(MAX_CONCURRENCY + 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    slowest_ok = max(elapsed for status, elapsed in results if status == 200)
    for status, elapsed in results:
        if status == 429:
            assert elapsed < slowest_ok  # refused without waiting for a slot


def test_correct_request_after_errors(client: Any) -> None:
    """After every kind of bad request above, results are still right and deterministic."""
    for path, body, _ in BAD_JSON_CASES[:3]:
        client.post(path, json=body)
    _upload(client, b"garbage", "x.mp3")
    first = text_to_audio(client, format="wav", seed=21)
    second = text_to_audio(client, format="wav", seed=21)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content


@pytest.mark.parametrize("failure", ["disconnect", "busy"])
def test_model_service_failures_answer_503_with_retry_after(client: Any, failure: str) -> None:
    import asyncio
    from types import SimpleNamespace

    import aiohttp
    from bentoml.exceptions import ServiceUnavailable

    from riffusion.schemas import GenerationJob, PromptInput
    from serving.errors import ApiError

    service = sys.modules["service"]
    api = service.Riffusion.inner  # the plain class behind the bentoml.Service

    calls = []

    async def failing_submit(request: Any) -> Any:
        calls.append(request)
        if failure == "disconnect":
            raise aiohttp.ServerDisconnectedError()
        raise ServiceUnavailable("busy")

    fake = SimpleNamespace(model=SimpleNamespace(to_async=SimpleNamespace(submit=failing_submit)))
    job = GenerationJob(start=PromptInput(prompt="x"), num_inference_steps=STEPS, width=64)
    with pytest.raises(ApiError) as raised:
        asyncio.run(api._generate(fake, [job]))
    error = raised.value.response()
    assert error.status_code == 503 and error.headers["Retry-After"] == "5"
    # Says what happened (a crashed worker is not "at capacity") and leaks no internals.
    message = json.loads(error.body)["error"]
    expected = "not answering (restarting?)" if failure == "disconnect" else "loading or restarting"
    assert expected in message and "Error" not in message, message
    # A dropped connection is retried once (jobs are deterministic); a busy answer is not.
    assert len(calls) == (2 if failure == "disconnect" else 1)
    # The real service still answers afterwards.
    assert client.post("/run_inference/", json=WEB_APP_REQUEST).status_code == 200
