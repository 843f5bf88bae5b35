"""A throwaway local ``bentoml serve service:Riffusion`` for load tests, benchmarks and tests.

``LocalServer`` starts the service on a free 127.0.0.1 port in its own process group
(so the API and model-service workers die with it), waits for ``/readyz`` and stops
the whole group on exit::

    with LocalServer(log_path, model="tiny", env={"RIFFUSION_BATCHING": "off"}) as server:
        httpx.get(f"{server.url}/readyz")

Deliberately free of locust: importing locust monkey-patches the standard library.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
# BentoML keeps restarting a worker whose service fails to construct; this line in the
# log means it never will start, so waiting out the timeout would be pointless.
STARTUP_FAILED_MARKER = "Application startup failed"
READY_POLL_S = 0.5


class StartupError(RuntimeError):
    """A process this module starts is missing, died, or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def executable(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise StartupError(f"{name!r} is not installed in this environment")
    return found


def stop_process_group(
    process: subprocess.Popen[bytes], first_signal: int = signal.SIGTERM, grace_s: float = 15.0
) -> None:
    """Signal the process group, wait ``grace_s``, then kill it and any stray descendants.

    BentoML's supervisor starts each worker in a session of its own, out of reach of
    ``killpg``; the descendants are listed before signalling so none outlives the server.
    """
    if process.poll() is not None:
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, first_signal)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)  # SIGKILL lands asynchronously


def refused_start(cwd: Path, env: Mapping[str, str], timeout_s: float = 300.0) -> str:
    """Run ``bentoml serve`` that must refuse to start; its whole output, one line.

    Raises ``StartupError`` if it exits 0 or says more than one line (a refusal at
    start-up is one line naming the setting to change, never a traceback)."""
    command = [executable("bentoml"), "serve", "service:Riffusion", "--host", "127.0.0.1"]
    result = subprocess.run(
        [*command, "--port", str(free_port())],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode == 0 or len(output.splitlines()) != 1:
        raise StartupError(f"expected a one-line refusal, exit {result.returncode}:\n{output}")
    return output


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when there is none yet)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def server_env(model: str, overrides: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment with ``RIFFUSION_MODEL`` and ``overrides`` (None unsets)."""
    env = {**os.environ, "RIFFUSION_MODEL": model, "BENTOML_DO_NOT_TRACK": "1"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass
class LocalServer:
    """``bentoml serve service:Riffusion`` on a free loopback port, in its own process group.

    ``env`` adds to (or, with ``None``, removes from) this process's environment, e.g.
    ``RIFFUSION_BATCHING``, ``RIFFUSION_API_KEY`` or a temporary ``BENTOML_HOME``.
    Usage tracking is off unless ``env`` sets ``BENTOML_DO_NOT_TRACK`` otherwise.
    """

    log_path: Path
    model: str = "tiny"
    env: Mapping[str, str | None] = field(default_factory=dict)
    ready_timeout_s: float = 300.0
    port: int = 0
    repo: Path = REPO_ROOT  # the checkout whose service.py is served
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        """Start the server and wait until it is ready; stops it again if it is not."""
        self.port = self.port or free_port()
        command = [executable("bentoml"), "serve", "service:Riffusion"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.repo,
                env=server_env(self.model, self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Poll ``/readyz``; raise ``StartupError`` with the log tail if the server fails."""
        if self.process is None:
            raise StartupError("the server was not started")
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"server exited with code {self.process.returncode} before it was ready")
            if STARTUP_FAILED_MARKER in self.log_path.read_text(errors="replace"):
                self._fail("server failed to start")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(READY_POLL_S)
        self._fail(f"server not ready after {self.ready_timeout_s:.0f} s")

    def wait_logged(self, text: str, timeout_s: float = 120.0) -> None:
        """Wait until the server's log holds ``text`` (lines can follow ``/readyz``'s 200)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                self._fail(f"{text!r} not logged within {timeout_s:.0f} s")
            time.sleep(READY_POLL_S)

    def _fail(self, reason: str) -> NoReturn:
        raise StartupError(f"{reason}; log {self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
