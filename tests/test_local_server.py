"""load_tests.server.LocalServer's failure paths, with a stand-in for ``bentoml serve``.

The real server is exercised by test_service_serve.py and test_loadtest.py; here a
shell script plays a server that dies or that logs BentoML's start-up failure, so
the error messages and the clean-up are checked in well under a second.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import psutil
import pytest

from load_tests import server as server_module
from load_tests.server import LocalServer, StartupError, server_env


def _fake_bentoml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str) -> None:
    path = tmp_path / "fake-bentoml"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(server_module, "executable", lambda _name: str(path))


def test_server_that_exits_raises_with_its_exit_code_and_log_tail(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_bentoml(monkeypatch, tmp_path, "echo 'model not found: nope'\nexit 3")
    with pytest.raises(StartupError, match=r"exited with code 3(.|\n)*model not found: nope"):
        LocalServer(tmp_path / "serve.log", ready_timeout_s=30).start()


def test_startup_failure_in_log_fails_fast_and_kills_the_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Like BentoML: the failure is logged but the process lives on (restarting workers).
    _fake_bentoml(monkeypatch, tmp_path, "echo 'Application startup failed'\nexec sleep 60")
    server = LocalServer(tmp_path / "serve.log", ready_timeout_s=60)
    began = time.monotonic()
    with pytest.raises(StartupError, match="failed to start"):
        server.start()
    assert time.monotonic() - began < 10
    assert server.process is not None and server.process.poll() is not None


def test_not_ready_in_time_raises_and_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_bentoml(monkeypatch, tmp_path, "exec sleep 60")
    server = LocalServer(tmp_path / "serve.log", ready_timeout_s=1)
    with pytest.raises(StartupError, match="not ready after 1 s"):
        server.start()
    assert server.process is not None and server.process.poll() is not None


def test_env_sets_model_adds_and_removes_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIFFUSION_API_KEY", "secret")
    env = server_env("tiny", {"RIFFUSION_API_KEY": None, "RIFFUSION_MAX_BATCH_SIZE": "1"})
    assert env["RIFFUSION_MODEL"] == "tiny"
    assert env["RIFFUSION_MAX_BATCH_SIZE"] == "1"
    assert "RIFFUSION_API_KEY" not in env
    assert env["BENTOML_DO_NOT_TRACK"] == "1"
    assert env["PATH"] == os.environ["PATH"]


def test_workers_in_their_own_session_are_stopped_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # BentoML's supervisor starts workers with setsid: killing the group misses them.
    pid_file = tmp_path / "worker.pid"
    _fake_bentoml(
        monkeypatch,
        tmp_path,
        f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 60' &\nexec sleep 60",
    )
    server = LocalServer(tmp_path / "serve.log", ready_timeout_s=1)
    deadline = time.monotonic() + 5
    with pytest.raises(StartupError):
        server.start()
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_pid = int(pid_file.read_text())
    assert not psutil.pid_exists(worker_pid) or (
        psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
    )
