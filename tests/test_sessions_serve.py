"""Listener sessions over a served instance: the real engine, admission, cancellation, SIGTERM.

One dedicated instance (it is capped at one listener, and the last test stops it):
tiny model, the project's seed images (5.12 s clips), few steps, so a clip takes a
second or two even on a loaded machine and a listener never waits on the model.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import websocket

from load_tests.client import metric_total
from load_tests.server import LocalServer
from load_tests.session_client import SessionListener, session_url
from tests.shared_servers import READY_TIMEOUT_S

API_KEY = "session-test-key"
SETTINGS = {"prompt": "church bells on sunday", "seed": 5, "num_inference_steps": 4}
SHUTDOWN_BUDGET_S = 60.0
# The listener of the real-time test plays at this fraction of real speed and reports its
# true position, which the server schedules against: on a machine loaded by other work a
# clip can take longer than it plays. docs/benchmarks.md measures full speed, quietly.
SLOW_LISTENER = 0.25


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    home = tmp_path_factory.mktemp("sessions")
    env: dict[str, str | None] = {
        "BENTOML_HOME": str(home / "bentoml"),
        "HF_HUB_OFFLINE": "1",
        "RIFFUSION_API_KEY": API_KEY,
        "RIFFUSION_SEED_IMAGES_DIR": None,
        # One place, whatever this machine's speed (other work may share its cores): the
        # prediction itself is tested in tests/test_listener_admission.py.
        "RIFFUSION_SESSION_MAX_LISTENERS": "1",
        "RIFFUSION_SESSION_ADMISSION": "cap",
        # A session outlives the header timeout many times over: it applies to headers
        # only, never to a connection upgraded to a WebSocket.
        "RIFFUSION_HEADER_TIMEOUT_S": "2",
    }
    with LocalServer(home / "serve.log", "tiny", env, READY_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="module")
def url(served: LocalServer) -> str:
    return served.url


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def listening(url: str, speed: float = 1.0, **settings: Any) -> Iterator[SessionListener]:
    """An open, admitted session (the one place frees once an earlier test's listener left)."""
    deadline = time.monotonic() + 60
    while True:
        listener = SessionListener(
            url, {**SETTINGS, **settings}, api_key=API_KEY, playback_speed=speed
        )
        answer = listener.open()
        if answer["type"] == "accepted":
            break
        assert time.monotonic() < deadline, f"no place for a listener: {answer}"
        time.sleep(0.5)
    try:
        yield listener
    finally:
        listener.close()


def test_a_session_receives_clips_in_order_in_real_time(url: str) -> None:
    with listening(url, speed=SLOW_LISTENER) as listener:
        wait_for(lambda: metric_total(url, "riffusion_sessions_active") == 1, 30, "the gauge")
        clips = list(listener.clips(count=4))
    assert [c["index"] for c in clips] == [0, 1, 2, 3]
    assert [c["alpha"] for c in clips] == [0.0, 0.25, 0.5, 0.75]
    assert all(c["start"] == {"prompt": SETTINGS["prompt"], "seed": 5} for c in clips)
    assert all(c["image"].startswith("data:image/jpeg;base64,") for c in clips)
    assert all(c["audio"].startswith("data:audio/mpeg;base64,") for c in clips)
    assert all(abs(c["duration_s"] - 5.12) < 0.05 for c in clips)
    assert listener.report.underruns == [], listener.report
    # The server generated ahead of playback, and no further than its lookahead.
    assert max(c["buffer_ahead_s"] for c in clips) <= 10.24 + 5.12
    wait_for(lambda: metric_total(url, "riffusion_sessions_active") == 0, 30, "the gauge to fall")
    assert metric_total(url, "riffusion_session_buffer_ahead_seconds_count") >= 4


def test_a_prompt_sent_mid_session_shows_in_the_next_clips(url: str) -> None:
    with listening(url) as listener:
        clips = []
        for clip in listener.clips(count=4):
            clips.append(clip)
            if clip["index"] == 0:
                listener.steer("jazz with piano", seed_image_id="vibes")
    steered = [c for c in clips if c["end"]["prompt"] == "jazz with piano"]
    assert steered, [c["end"] for c in clips]
    # At most the clip already in flight comes before it.
    assert steered[0]["index"] <= 2
    assert steered[0]["seed_image_id"] == "vibes"
    assert steered[0]["timings"]["steer_to_sent_s"] > 0


def test_admission_refuses_when_full_and_accepts_when_a_listener_leaves(url: str) -> None:
    with listening(url):
        refused_before = metric_total(url, "riffusion_sessions_refused_total")
        second = SessionListener(url, SETTINGS, api_key=API_KEY)
        began = time.monotonic()
        answer = second.open()
        refused_in_s = time.monotonic() - began
        assert answer["type"] == "refused", answer
        assert "full" in answer["message"] and answer["retry_after_s"] > 0
        assert refused_in_s < 10  # at once (the benchmark measures it on a quiet machine)
        assert metric_total(url, "riffusion_sessions_refused_total") == refused_before + 1
    # The first listener left: a new one gets its place (once the server has seen it go).
    with listening(url) as third:
        assert third.report.accepted


def test_a_listener_who_drops_stops_their_clip_within_a_step(url: str) -> None:
    cancelled_before = metric_total(url, "riffusion_engine_jobs_total", {"event": "cancelled"})
    samples_before = metric_total(url, "riffusion_unet_samples_total", {"outcome": "cancelled"})
    start = {"type": "start", "api_key": API_KEY, "prompt": "long one", "denoising": 1.0}
    deadline = time.monotonic() + 60
    while True:  # the one place frees once the earlier test's listener has gone
        socket = websocket.create_connection(session_url(url), timeout=30)
        socket.send(json.dumps({**start, "num_inference_steps": 150}))
        answer = json.loads(socket.recv())
        if answer["type"] == "accepted":
            break
        socket.close()
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    wait_for(lambda: metric_total(url, "riffusion_engine_running_jobs") >= 1, 60, "the clip")
    socket.close()  # the listener goes away mid-clip
    wait_for(
        lambda: (
            metric_total(url, "riffusion_engine_jobs_total", {"event": "cancelled"})
            > cancelled_before
        ),
        30,
        "the engine to cancel the clip",
    )
    wait_for(lambda: metric_total(url, "riffusion_sessions_active") == 0, 30, "the gauge to fall")
    spent = metric_total(url, "riffusion_unet_samples_total", {"outcome": "cancelled"})
    assert 0 < spent - samples_before < 300  # far short of its 150 steps


def test_sigterm_tells_each_session_to_reconnect_then_exits(served: LocalServer) -> None:
    """Run last: stops the server."""
    assert served.process is not None
    listener = SessionListener(served.url, SETTINGS, api_key=API_KEY)
    assert listener.open()["type"] == "accepted"
    clips = listener.clips()
    next(clips)  # playing
    began = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    rest = list(clips)  # the clip in flight may still come, then the reconnect
    assert listener.report.ended_by == "reconnect", (listener.report, rest)
    assert len(rest) <= 2
    served.process.wait(timeout=SHUTDOWN_BUDGET_S)
    assert time.monotonic() - began < SHUTDOWN_BUDGET_S
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(served.port) in _cmd(p)]


def _cmd(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.info["cmdline"] or [])
    return ""
