"""Shutdown within its budget, over HTTP against served instances (serving/shutdown.py).

SIGTERM to ``bentoml serve`` (as Kubernetes sends it after the preStop pause):
clips in flight finish or are answered 503 with Retry-After when
``RIFFUSION_SHUTDOWN_GRACE_S`` ends, and the server exits within the budget
(deploy/README.md: grace + 10 s). The test ends its instance, so it starts a
dedicated one.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from load_tests.client import work_in_flight
from load_tests.server import LocalServer, log_tail
from tests.shared_servers import READY_TIMEOUT_S
from tests.test_deploy import EXIT_MARGIN_S

# Clips long enough to outlast a short grace even on a fast machine: the most steps,
# several seconds of audio, three at once.
LONG_CLIP = {"prompt": "slow piano", "num_inference_steps": 150, "duration_s": 5.12}
CLIENTS = 3
SHORT_GRACE_S = 4.0
# Longer than the clips take on a loaded machine: a server that waited for them, or for
# the grace, would still be up when the test looks.
LONG_GRACE_S = 120.0
# A loaded 2-core machine answers a little after the deadline it aims at.
ANSWER_SLACK_S = 5.0


def _serve(tmp_path: Path, grace_s: float) -> LocalServer:
    env = {
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "HF_HUB_OFFLINE": "1",
        "RIFFUSION_API_KEY": None,
        "RIFFUSION_SHUTDOWN_GRACE_S": str(grace_s),
    }
    return LocalServer(tmp_path / "serve.log", "tiny", env, READY_TIMEOUT_S).start()


@pytest.fixture
def serve_with_grace(tmp_path: Path) -> Iterator[Callable[[float], LocalServer]]:
    """Starts an instance with the given shutdown grace; stops it after the test."""
    started: list[LocalServer] = []

    def start(grace_s: float) -> LocalServer:
        started.append(_serve(tmp_path, grace_s))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _wait_in_flight(server: LocalServer, clips: int) -> None:
    deadline = time.monotonic() + 120
    while work_in_flight(server.url).get("riffusion_clips_in_flight", 0) < clips:
        assert time.monotonic() < deadline, log_tail(server.log_path)
        time.sleep(0.1)


def _wait_exit(server: LocalServer, timeout_s: float) -> float:
    """Seconds until the server process exits (fails past ``timeout_s``)."""
    assert server.process is not None
    started = time.monotonic()
    while server.process.poll() is None:
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, f"still running after {elapsed:.1f} s:\n" + log_tail(
            server.log_path
        )
        time.sleep(0.1)
    return time.monotonic() - started


def test_clips_in_flight_are_answered_before_the_grace_ends(
    serve_with_grace: Callable[[float], LocalServer],
) -> None:
    server = serve_with_grace(SHORT_GRACE_S)
    server.wait_logged("Riffusion ready: model")

    def call(seed: int) -> tuple[httpx.Response, float]:
        response = httpx.post(
            f"{server.url}/text_to_audio", json={**LONG_CLIP, "seed": seed}, timeout=300
        )
        return response, time.monotonic()

    with ThreadPoolExecutor(CLIENTS) as pool:
        calls: list[Future[tuple[httpx.Response, float]]] = [
            pool.submit(call, seed) for seed in range(CLIENTS)
        ]
        _wait_in_flight(server, CLIENTS)
        assert server.process is not None
        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        answers = [c.result(timeout=SHORT_GRACE_S + EXIT_MARGIN_S + 60) for c in calls]
        exited_after_s = _wait_exit(server, SHORT_GRACE_S + EXIT_MARGIN_S)

    statuses = [response.status_code for response, _ in answers]
    # Finished within the grace (200) or answered at its end: 503 with Retry-After.
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "the clips finished within a 4 s grace: make them longer"
    for response, answered_at in answers:
        assert answered_at - sigterm_at <= SHORT_GRACE_S + ANSWER_SLACK_S
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            # Whichever service's grace ends first answers (the API, or the model service
            # through it): the project's JSON error either way.
            assert response.json()["error"]
    assert exited_after_s <= SHORT_GRACE_S + EXIT_MARGIN_S


def _access_lines(server: LocalServer, path: str, status: int) -> list[str]:
    return [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if f"path={path}," in line and f"(status={status}," in line
    ]


def test_clips_whose_clients_leave_during_the_shutdown_are_dropped(
    serve_with_grace: Callable[[float], LocalServer],
) -> None:
    """Clients that hang up after SIGTERM: their clips are dropped (the model service's
    calls end 499, "client closed request", not 200 or the grace's 503) and the server
    exits without waiting for the grace, which is longer than the clips."""
    server = serve_with_grace(LONG_GRACE_S)
    body = json.dumps({**LONG_CLIP, "duration_s": 20.48}).encode()
    request = (
        "POST /text_to_audio HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    address = ("127.0.0.1", server.port)
    clients = [socket.create_connection(address, timeout=10) for _ in range(CLIENTS)]
    try:
        for client in clients:
            client.sendall(request)
        _wait_in_flight(server, len(clients))
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        server.wait_logged("SIGTERM: finishing")
    finally:
        for client in clients:
            client.close()
    exited_after_s = _wait_exit(server, LONG_GRACE_S)
    assert len(_access_lines(server, "/submit", 499)) == len(clients), log_tail(server.log_path)
    assert not _access_lines(server, "/submit", 200) and not _access_lines(server, "/submit", 503)
    assert exited_after_s < LONG_GRACE_S
