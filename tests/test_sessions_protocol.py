"""The session protocol in process, against a stand-in model service (fast clips).

Served end-to-end behaviour (real engine, real admission, SIGTERM) is in
tests/test_sessions_serve.py; here each rule of the protocol gets a quick check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from riffusion.api_schemas import ListenerDecision
from riffusion.schemas import GenerationJob
from serving.errors import ApiError
from serving.sessions import (
    POLICY_VIOLATION,
    SERVICE_RESTART,
    TRY_AGAIN_LATER,
    SessionConfig,
    SessionHub,
)

CLIP_S = 0.4  # stand-in clips are short so the tests are quick


class FakeGate:
    """Admits up to ``capacity`` listeners; makes each clip in ``make_s``."""

    def __init__(self, capacity: int = 2, make_s: float = 0.01) -> None:
        self.capacity = capacity
        self.make_s = make_s
        self.open_ids: set[str] = set()
        self.jobs: list[tuple[GenerationJob, float]] = []
        self.cancelled = threading.Event()
        self.fail_next: ApiError | None = None
        self.started = threading.Event()
        self.checked: list[GenerationJob] = []
        # When set, every clip after the first waits for it (the test's turn to act).
        self.gate_open: threading.Event | None = None

    def check(self, job: GenerationJob) -> None:
        self.checked.append(job)
        for image_id, field in (
            (job.seed_image_id, "seed_image_id"),
            (job.mask_image_id, "mask_image_id"),
        ):
            if image_id is not None and image_id.startswith("unknown"):
                raise ApiError(400, field, f"no such image: {image_id!r}")

    async def open(self, listener_id: str, job: GenerationJob) -> ListenerDecision:
        if len(self.open_ids) >= self.capacity:
            return ListenerDecision(
                accepted=False, message="the service is full; retry in 30 s", retry_after_s=30.0
            )
        self.open_ids.add(listener_id)
        return ListenerDecision(accepted=True, message="admitted")

    async def close(self, listener_id: str) -> None:
        self.open_ids.discard(listener_id)

    async def clip(self, job: GenerationJob, listener_id: str, due_s: float) -> Any:
        self.jobs.append((job, due_s))
        self.started.set()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        if self.gate_open is not None and len(self.jobs) > 1:
            await asyncio.to_thread(self.gate_open.wait, 30)
        try:
            await asyncio.sleep(self.make_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return {"duration_s": CLIP_S}


async def encode(result: Any) -> dict[str, Any]:
    return {"image": "data:image/jpeg;base64,", "audio": "data:audio/mpeg;base64,", **result}


def client_for(gate: FakeGate, **config: Any) -> tuple[TestClient, SessionHub]:
    settings = {"lookahead_s": 2 * CLIP_S, "margin_s": 0.1, "start_timeout_s": 5.0, **config}
    hub = SessionHub(gate, encode, SessionConfig(**settings))
    app = Starlette(routes=[WebSocketRoute("/session", hub.serve)])
    return TestClient(app), hub


START = {"type": "start", "prompt": "church bells", "seed": 3, "num_inference_steps": 10}


def test_a_session_streams_clips_in_order_with_the_walk_and_a_bounded_lookahead() -> None:
    gate = FakeGate()
    client, _ = client_for(gate)
    with client.websocket_connect("/session") as ws:
        ws.send_json(START)
        accepted = ws.receive_json()
        assert accepted["type"] == "accepted" and accepted["session_id"]
        clips = [ws.receive_json() for _ in range(6)]
    assert [c["index"] for c in clips] == list(range(6))
    assert [c["alpha"] for c in clips] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.25]
    assert clips[0]["start"] == {"prompt": "church bells", "seed": 3}
    assert all(c["type"] == "clip" and c["audio"].startswith("data:audio/mpeg") for c in clips)
    # Never more than the lookahead plus one clip buffered when a clip is asked for.
    assert max(c["buffer_ahead_s"] for c in clips) < 2 * CLIP_S + 1e-6
    # The first clip is due at once; later ones when the buffer would run dry, less margin.
    assert clips[0]["due_in_s"] == 0.0
    for c in clips:
        assert c["due_in_s"] == pytest.approx(max(0.0, c["buffer_ahead_s"] - 0.1), abs=0.05)


def test_a_steer_shows_in_the_next_clip_and_reports_its_delay() -> None:
    gate = FakeGate()
    gate.gate_open = threading.Event()  # clip 1 is in flight until the steer is in
    client, _ = client_for(gate)
    with client.websocket_connect("/session") as ws:
        ws.send_json(START)
        ws.receive_json()
        first = ws.receive_json()
        ws.send_json({"type": "steer", "prompt": "jazz with piano"})
        deadline = time.monotonic() + 30
        while not any(j.end and j.end.prompt == "jazz with piano" for j in gate.checked):
            assert time.monotonic() < deadline, "the steer never arrived"
            time.sleep(0.01)
        gate.gate_open.set()
        clips = [first, *(ws.receive_json() for _ in range(3))]
    ends = [c["end"]["prompt"] for c in clips]
    # Clip 1 was asked for before the steer; clip 2, the next one, already carries it.
    assert ends == ["church bells", "church bells", "jazz with piano", "jazz with piano"]
    assert "steer_to_sent_s" in clips[2]["timings"]
    assert "steer_to_sent_s" not in clips[3]["timings"]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "start", "prompt": " "}, "prompt"),
        ({"type": "start", "prompt": "x", "seed_image_id": "../../etc"}, "seed_image_id"),
        ({"type": "play", "prompt": "x"}, "type"),
        ({"type": "start", "prompt": "x", "steps": 10}, "steps"),
        ({"type": "start", "prompt": "x", "seed_image_id": "unknown_beat"}, "seed_image_id"),
    ],
)
def test_a_bad_start_is_refused_naming_the_field(message: dict[str, Any], field: str) -> None:
    client, _ = client_for(FakeGate())
    with client.websocket_connect("/session") as ws:
        ws.send_json(message)
        error = ws.receive_json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert error["type"] == "error" and error["field"] == field
    assert closed.value.code == POLICY_VIOLATION


def test_the_api_key_is_checked_in_the_start_message() -> None:
    client, _ = client_for(FakeGate(), api_key="sesame")
    with client.websocket_connect("/session") as ws:
        ws.send_json({**START, "api_key": "wrong"})
        assert ws.receive_json()["field"] == "api_key"
    with client.websocket_connect("/session") as ws:
        ws.send_json({**START, "api_key": "sesame"})
        assert ws.receive_json()["type"] == "accepted"


def test_bad_messages_mid_session_get_an_error_and_the_session_goes_on() -> None:
    client, _ = client_for(FakeGate())
    with client.websocket_connect("/session") as ws:
        ws.send_json(START)
        ws.receive_json()
        ws.send_text("not json")
        ws.send_json({"type": "played", "position_s": -3})
        ws.send_json({"type": "steer", "prompt": "x", "mask_image_id": "unknown_mask"})
        seen: list[dict[str, Any]] = []
        while len([m for m in seen if m["type"] == "error"]) < 3:
            seen.append(ws.receive_json())
        assert ws.receive_json()["type"] == "clip"
    errors = [m for m in seen if m["type"] == "error"]
    assert [e["field"] for e in errors] == ["message", "position_s", "mask_image_id"]


def test_a_full_service_refuses_at_once_with_a_retry_hint_and_admits_after_a_leave() -> None:
    gate = FakeGate(capacity=1)
    client, _ = client_for(gate)
    with client.websocket_connect("/session") as first:
        first.send_json(START)
        assert first.receive_json()["type"] == "accepted"
        with client.websocket_connect("/session") as second:
            second.send_json(START)
            refused = second.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
        assert refused["type"] == "refused" and refused["retry_after_s"] == 30.0
        assert closed.value.code == TRY_AGAIN_LATER
    # The first listener left: its place is free again.
    with client.websocket_connect("/session") as third:
        third.send_json(START)
        assert third.receive_json()["type"] == "accepted"


def test_a_listener_who_leaves_has_the_clip_in_flight_cancelled_and_the_place_freed() -> None:
    gate = FakeGate(make_s=30.0)
    client, hub = client_for(gate)
    with client.websocket_connect("/session") as ws:
        ws.send_json(START)
        assert ws.receive_json()["type"] == "accepted"
        assert gate.started.wait(10)
    assert gate.cancelled.wait(10)
    assert not gate.open_ids and hub.active == 0


def test_a_service_failure_is_reported_and_the_same_clip_retried() -> None:
    gate = FakeGate()
    gate.fail_next = ApiError(503, None, "at capacity", 0.05)
    client, _ = client_for(gate)
    with client.websocket_connect("/session") as ws:
        ws.send_json(START)
        ws.receive_json()
        error, clip = ws.receive_json(), ws.receive_json()
    assert error["type"] == "error" and error["status"] == 503
    assert clip["index"] == 0 and gate.jobs[0][0] == gate.jobs[1][0]


def test_a_steer_the_model_cannot_take_is_undone_and_the_jam_goes_on() -> None:
    gate = FakeGate(make_s=0.2)
    client, _ = client_for(gate)
    with client.websocket_connect("/session") as ws:
        ws.send_json(START)
        ws.receive_json()
        ws.receive_json()  # clip 0
        gate.fail_next = ApiError(400, "end.prompt", "too many CLIP tokens")
        ws.send_json({"type": "steer", "prompt": "word " * 60})
        messages = [ws.receive_json() for _ in range(3)]
    error = next(m for m in messages if m["type"] == "error")
    assert error["field"] == "end.prompt"
    clips = [m for m in messages if m["type"] == "clip"]
    assert clips and all(c["end"]["prompt"] == "church bells" for c in clips)


def test_draining_ends_each_session_after_its_clip_in_flight_with_a_reconnect() -> None:
    gate = FakeGate(make_s=0.3)
    client, hub = client_for(gate)
    with client, client.websocket_connect("/session") as ws:  # one event loop for both
        ws.send_json(START)
        ws.receive_json()
        assert gate.started.wait(10)
        assert client.portal is not None
        client.portal.call(hub.drain)
        messages = []
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                messages.append(ws.receive_json())
    assert [m["type"] for m in messages] == ["clip", "reconnect"]
    assert closed.value.code == SERVICE_RESTART
