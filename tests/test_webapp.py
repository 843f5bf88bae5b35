"""The riffusion web app end to end: its request quirks, and its real session against a
served instance."""

from __future__ import annotations

import base64
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from pydantic import ValidationError

from load_tests.client import prompt_input, web_app_body
from load_tests.server import LocalServer
from riffusion.api_schemas import RunInferenceRequest

START = {"prompt": "church bells on sunday", "seed": 42, "denoising": 0.75, "guidance": 7.0}


@pytest.mark.parametrize(
    ("sent", "used"),
    [
        (1.0000000000000002, 1.0),  # 0.25 stepped four times in floating point
        (1.0009, 1.0),
        (-0.0009, 0.0),
        (0.75, 0.75),
    ],
)
def test_alpha_within_tolerance_is_clamped(sent: float, used: float) -> None:
    request = RunInferenceRequest.model_validate({"alpha": sent, "start": START})
    assert request.alpha == used
    assert request.to_job().alpha == used


@pytest.mark.parametrize("alpha", [1.0011, -0.0011, 2.0])
def test_alpha_beyond_tolerance_is_refused_naming_the_field(alpha: float) -> None:
    with pytest.raises(ValidationError) as error:
        RunInferenceRequest.model_validate({"alpha": alpha, "start": START})
    assert error.value.errors()[0]["loc"] == ("alpha",)


@pytest.mark.parametrize("mask", [None, ""])
def test_null_and_empty_mask_mean_no_mask(mask: str | None) -> None:
    request = RunInferenceRequest.model_validate({"mask_image_id": mask, "start": START})
    assert request.mask_image_id is None and request.to_job().mask_image_id is None


def test_mask_ids_are_still_validated() -> None:
    with pytest.raises(ValidationError) as error:
        RunInferenceRequest.model_validate({"mask_image_id": "../x", "start": START})
    assert error.value.errors()[0]["loc"] == ("mask_image_id",)


# ------------------------------------------------------------------ the app's session, served

# The app's /api/server proxy aborts after 60 s (AbortSignal.timeout(60000)); README's
# settings keep a clip within that. Here the test machine is shared with other test runs,
# so the replay waits longer rather than fail on a busy moment.
REPLAY_TIMEOUT_S = 300.0
# Few steps keep CPU clips cheap; the app's own 50 steps are what the README budgets for.
STEPS = 4
ALPHA_VELOCITY = 0.25


def js_stringify(value: Any) -> str:
    """``JSON.stringify``: compact, and whole numbers without a fraction (1.0 -> 1, 7.0 -> 7)."""

    def js_numbers(item: Any) -> Any:
        if isinstance(item, float) and item.is_integer():
            return int(item)
        if isinstance(item, dict):
            return {key: js_numbers(inner) for key, inner in item.items()}
        return item

    return json.dumps(js_numbers(value), separators=(",", ":"))


def app_request(
    alpha: float,
    seed: int,
    seed_image_id: str = "og_beat",
    mask_image_id: str | None = None,
    prompt: str = "church bells on sunday",
) -> dict[str, Any]:
    """ModelInference.runInference's body, keys in its order, same prompt (no transition):
    the end input repeats the prompt with the next seed."""
    return web_app_body(
        alpha,
        prompt_input(prompt, seed),
        prompt_input(prompt, seed + 1),
        STEPS,
        seed_image_id,
        mask_image_id,
    )


def proxy(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """pages/api/server.js: forwards the browser's body as JSON and answers
    ``200 {"data": <service JSON>}`` whatever the service said."""
    response = client.post(
        "/run_inference/",
        content=js_stringify(body).encode(),
        headers={"Content-Type": "application/json", "Access-Control-Allow-Origin": "*"},
        timeout=REPLAY_TIMEOUT_S,
    )
    return {"data": response.json()}


@dataclass
class PlayedClip:
    alpha: float
    seed: int
    pixels: np.ndarray
    audio_seconds: float


def play(answer: dict[str, Any]) -> tuple[np.ndarray, float]:
    """What the app does with a result: ``data.image`` into an <img>, ``data.audio`` into the
    audio player; both are data URLs. An error body here is what blanks the app."""
    result = answer["data"]
    assert "error" not in result, result
    assert result["image"].startswith("data:image/jpeg;base64,")
    assert result["audio"].startswith("data:audio/mpeg;base64,")
    jpeg = base64.b64decode(result["image"].split(",", 1)[1], validate=True)
    mp3 = base64.b64decode(result["audio"].split(",", 1)[1], validate=True)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (512, 512)
    samples, sample_rate = sf.read(io.BytesIO(mp3), dtype="float32", always_2d=True)
    assert sample_rate == 44100 and np.abs(samples).max() > 0
    return np.asarray(image.convert("L"), dtype=np.int16), samples.shape[0] / sample_rate


@pytest.fixture(scope="module")
def app_client(open_server: LocalServer) -> Iterator[httpx.Client]:
    """A served instance set up as README's 'Using the riffusion web app' says: no API key
    (the app's proxy sends none)."""
    with httpx.Client(base_url=open_server.url) as client:
        yield client


def test_web_app_session_alpha_walk_and_seed_roll_over(app_client: httpx.Client) -> None:
    """The app's default session: og_beat, no mask, alpha 0.25 -> 1.0, then roll-over."""
    alpha, seed = ALPHA_VELOCITY, 42
    played: list[PlayedClip] = []
    for _ in range(5):
        pixels, seconds = play(proxy(app_client, app_request(alpha, seed)))
        played.append(PlayedClip(alpha, seed, pixels, seconds))
        # newResultCallback: step alpha; above 1 + 1e-3 it rolls over and the seed moves on.
        alpha += ALPHA_VELOCITY
        if alpha > 1 + 1e-3:
            alpha -= 1
            seed += 1
    assert [(clip.alpha, clip.seed) for clip in played] == [
        (0.25, 42),
        (0.5, 42),
        (0.75, 42),
        (1.0, 42),
        (0.25, 43),
    ]
    assert all(clip.audio_seconds == pytest.approx(5.11, abs=0.06) for clip in played)
    # Each step is a different clip; the rolled-over one is not a replay of the first.
    for earlier, later in itertools.pairwise(played):
        assert np.abs(earlier.pixels - later.pixels).mean() > 1
    assert np.abs(played[0].pixels - played[4].pixels).mean() > 1

    # Floating-point drift at the end of a walk is clamped: the same clip as alpha = 1.
    drifted, _ = play(proxy(app_client, app_request(1.0000000000000002, 42)))
    assert np.abs(drifted - played[3].pixels).mean() < 0.5


@pytest.mark.parametrize(
    ("seed_image_id", "mask_image_id"),
    [
        # ?seedImageId=<id>&maskImageId=none: the app sends mask_image_id "".
        ("agile", ""),
        ("marim", "mask_top_third_95"),
        ("motorway", ""),
        ("vibes", "mask_beat_lines_80"),
    ],
)
def test_every_seed_from_the_settings_menu(
    app_client: httpx.Client, seed_image_id: str, mask_image_id: str
) -> None:
    """Each seed the app offers (og_beat above), with "" and riffusion's masks (all of
    which exist: tests/test_seed_images.py)."""
    _, seconds = play(proxy(app_client, app_request(0.5, 7, seed_image_id, mask_image_id)))
    assert seconds == pytest.approx(5.11, abs=0.06)


def test_unknown_id_is_a_clear_error_body_through_the_proxy(app_client: httpx.Client) -> None:
    """Ids outside the library still answer an error naming the field (the app would show
    it as a broken result, so every id it offers must exist, as tested above)."""
    answer = proxy(app_client, app_request(0.5, 1, "no_such_seed"))
    assert "seed_image_id" in json.dumps(answer["data"])
    assert "og_beat" in json.dumps(answer["data"])
