"""The HTTP layer without a server: probe state, error shape, OpenAPI fixes, API key check."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.errors import shape_error_body
from serving.http import ModelProbe


def test_liveness_fails_only_after_the_grace_period_once_ready() -> None:
    state = {"ready": False}

    async def check() -> bool:
        return state["ready"]

    async def scenario() -> list[tuple[bool, bool]]:
        probe = ModelProbe(check, grace_s=0.3, refresh_s=0.0)
        seen = []
        await probe.poll()
        seen.append((probe.ready, probe.alive))  # loading at start-up: not ready, alive
        state["ready"] = True
        await probe.poll()
        seen.append((probe.ready, probe.alive))
        state["ready"] = False  # worker gone
        await probe.poll()
        seen.append((probe.ready, probe.alive))  # within the grace period
        await asyncio.sleep(0.4)
        await probe.poll()
        seen.append((probe.ready, probe.alive))  # past it
        state["ready"] = True
        await probe.poll()
        seen.append((probe.ready, probe.alive))  # back
        return seen

    assert asyncio.run(scenario()) == [
        (False, True),
        (True, True),
        (False, True),
        (False, False),
        (True, True),
    ]


def test_liveness_grace_counts_from_the_failure_not_from_the_last_poll() -> None:
    """Probes minutes apart: a model that just went away is still within its grace."""
    state = {"ready": True}

    async def check() -> bool:
        return state["ready"]

    async def scenario() -> list[bool]:
        probe = ModelProbe(check, grace_s=0.3, refresh_s=0.0)
        await probe.poll()
        await asyncio.sleep(0.5)  # nobody polls for longer than the grace period
        state["ready"] = False
        seen = []
        await probe.poll()
        seen.append(probe.alive)  # it has failed for 0 s, not for 0.5 s
        await asyncio.sleep(0.4)
        await probe.poll()
        seen.append(probe.alive)  # now past the grace since the failure
        return seen

    assert asyncio.run(scenario()) == [True, False]


def test_a_check_that_hangs_is_not_ready_long_before_its_timeout() -> None:
    """A killed worker's socket stays open in the supervisor: the check hangs, not fails."""
    state = {"hang": False}

    async def check() -> bool:
        if state["hang"]:
            await asyncio.sleep(3600)
        return True

    async def scenario() -> list[bool]:
        probe = ModelProbe(check, refresh_s=0.0, unresponsive_s=0.2, check_timeout_s=30)
        await probe.poll()
        seen = [probe.ready]
        state["hang"] = True
        await probe.poll()
        seen.append(probe.ready)  # just sent: the last answer still stands
        await asyncio.sleep(0.3)
        await probe.poll()
        seen.append(probe.ready)  # unanswered past unresponsive_s: not ready
        return seen

    assert asyncio.run(scenario()) == [True, True, False]


def test_a_hanging_model_check_does_not_hold_the_probe() -> None:
    async def hang() -> bool:
        await asyncio.sleep(3600)
        return True

    async def scenario() -> tuple[float, bool]:
        probe = ModelProbe(hang, wait_s=0.05, check_timeout_s=0.3)
        began = time.perf_counter()
        await probe.poll()
        waited = time.perf_counter() - began
        await asyncio.sleep(0.4)  # the background check times out: "not ready"
        return waited, probe.ready

    waited, ready = asyncio.run(scenario())
    assert waited < 0.2 and ready is False


def test_pydantic_errors_are_reshaped_to_name_the_field() -> None:
    bentoml_body = {
        "error": "1 validation error for RunInferenceRequestIODescriptor",
        "detail": [
            {"type": "float_type", "loc": ["start", "guidance"], "msg": "bad", "url": "u"},
        ],
    }
    shaped = shape_error_body(400, bentoml_body)
    assert shaped == {
        "error": "start.guidance: bad",
        "detail": [{"loc": ["start", "guidance"], "msg": "bad", "type": "float_type"}],
    }
    assert shape_error_body(400, shaped) is None  # already in shape


@pytest.mark.parametrize(
    ("status", "body", "error", "loc"),
    [
        (429, {"error": "Too many requests"}, "Too many requests", []),
        (400, [{"error": "audio: must be a file"}], "audio: must be a file", ["audio"]),
        (405, {"error": "Method Not Allowed"}, "Method Not Allowed", []),
        (500, "boom", "boom", []),
    ],
)
def test_other_error_bodies_are_reshaped(status: int, body: object, error: str, loc: list) -> None:
    shaped = shape_error_body(status, body)
    assert shaped is not None and shaped["error"] == error
    assert shaped["detail"][0]["loc"] == loc


def test_spec_marks_null_defaults_nullable() -> None:
    from serving.openapi import document_api

    body = {
        "type": "object",
        "properties": {
            "mask_image_id": {"type": "string", "default": None},
            "kind": {"type": "string", "enum": ["seed", "mask"], "default": None},
            "n": {"type": "integer"},
        },
    }
    spec = {
        "paths": {
            "/x": {"post": {"requestBody": {"content": {"application/json": {"schema": body}}}}}
        },
        "components": {"schemas": {}},
    }
    schema = document_api(spec)["paths"]["/x"]["post"]["requestBody"]["content"]["application/json"]
    properties = schema["schema"]["properties"]
    assert properties["mask_image_id"]["nullable"] is True
    assert "nullable" not in properties["n"]
    # An enum must list null itself (OpenAPI 3.0.3), or null reads as invalid.
    assert properties["kind"]["nullable"] is True and properties["kind"]["enum"][-1] is None


def test_run_inference_spec_admits_the_empty_mask_it_accepts() -> None:
    import re

    from riffusion.api_schemas import RunInferenceRequest

    pattern = RunInferenceRequest.model_json_schema()["properties"]["mask_image_id"]["anyOf"][0]
    assert re.match(pattern["pattern"], "") and re.match(pattern["pattern"], "mask_top_third_75")
    assert not re.match(pattern["pattern"], "../etc")
    assert RunInferenceRequest.model_validate({"start": {"prompt": "x"}, "mask_image_id": ""})


def test_a_dotted_field_is_a_nested_location() -> None:
    import json

    from serving.errors import error_response

    body = json.loads(error_response(400, "start.prompt", "too long").body)
    assert body == {
        "error": "start.prompt: too long",
        "detail": [{"loc": ["start", "prompt"], "msg": "too long", "type": "Bad Request"}],
    }


@pytest.mark.parametrize("decision", [True, False])
def test_api_key_middleware_decides_with_compare_digest(
    monkeypatch: pytest.MonkeyPatch, decision: bool
) -> None:
    """Every key, right, wrong or of another length, is judged by ``hmac.compare_digest``
    (``!=`` or a length check first would answer a wrong key faster than a nearly right one)."""
    import types

    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from serving import http

    calls: list[tuple[bytes, bytes]] = []

    def compare_digest(given: bytes, expected: bytes) -> bool:
        calls.append((given, expected))
        return decision

    monkeypatch.setattr(http, "hmac", types.SimpleNamespace(compare_digest=compare_digest))
    client = TestClient(http.ApiKeyMiddleware(PlainTextResponse("ok"), api_key="right-key"))
    for token in ("right-key", "wrong-key", "k", "right-key-and-more"):
        calls.clear()
        response = client.get("/seed_images", headers={"Authorization": f"Bearer {token}"})
        assert calls == [(token.encode(), b"right-key")], token
        assert response.status_code == (200 if decision else 401), token


def test_api_key_middleware_refuses_wrong_keys_of_any_length() -> None:
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from serving.http import ApiKeyMiddleware

    client = TestClient(ApiKeyMiddleware(PlainTextResponse("ok"), api_key="right-key"))
    for header, status in (
        ("Bearer right-key", 200),
        ("bearer  right-key ", 200),
        ("Bearer wrong-key", 401),
        ("Bearer right-ke", 401),
        ("Bearer right-key-and-more", 401),
        ("Basic right-key", 401),
        ("", 401),
    ):
        response = client.get("/seed_images", headers={"Authorization": header})
        assert response.status_code == status, header
    assert client.get("/readyz").status_code == 200  # probes need no key
