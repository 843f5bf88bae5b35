"""Served instances (``bentoml serve``, tiny model) shared by the test modules.

Starting one costs 30-50 s of a 2-core machine, so modules whose tests need the same
configuration, and leave the instance as they found it, share one (``tests/conftest.py``
names them as fixtures). Modules that kill workers, stop the server or need limits of
their own start a dedicated instance instead, and say why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from load_tests.client import wait_idle
from load_tests.server import LocalServer, StartupError

SHARED_API_KEY = "shared-test-key"
# The keyed instance serves the project's seed images cropped to this width (0.64 s
# clips, cheap on CPU); test_ui's docs screenshot (RIFFUSION_UI_SCREENSHOT) needs the
# full 5.12 s clips, so the instance then serves them uncropped.
SMALL_CLIP_PX = 512 if os.environ.get("RIFFUSION_UI_SCREENSHOT") else 64
READY_TIMEOUT_S = 600.0  # model load and worker start-up on a busy 2-core machine
IDLE_TIMEOUT_S = 300.0
# Work in flight on an instance: zero on a fresh one, and before each module gets it.
BUSY_GAUGES = (
    "riffusion_clips_in_flight",
    "riffusion_engine_waiting_jobs",
    "riffusion_engine_running_jobs",
)


@dataclass(frozen=True)
class ServedConfig:
    """One instance's configuration: environment overrides (None unsets) and its library."""

    env: dict[str, str | None]
    seed_library_px: int | None = None  # project seed images cropped to this width

    def overrides(self, home: Path) -> dict[str, str | None]:
        env = {
            **self.env,
            "BENTOML_HOME": str(home / "bentoml"),
            "HF_HUB_OFFLINE": "1",
            # Only adaptive batching reads it: there, batch rather than refuse slow CPU clips.
            "RIFFUSION_MAX_LATENCY_MS": "600000",
        }
        if self.seed_library_px is not None:
            from tests.test_service_api import make_small_library

            library = home / "seed_images"
            make_small_library(library, self.seed_library_px)
            env["RIFFUSION_SEED_IMAGES_DIR"] = str(library)
        return env


# fixture name -> configuration
SHARED_CONFIGS = {
    # With an API key and cheap clips: test_deploy, test_fuzz_api, test_ui.
    "keyed_server": ServedConfig(
        {
            "RIFFUSION_API_KEY": SHARED_API_KEY,
            # Small upload limits keep fuzzed uploads cheap.
            "RIFFUSION_MAX_UPLOAD_MB": "0.5",
            "RIFFUSION_MAX_UPLOAD_SECONDS": "3",
            # The playground's jam sessions are admitted whatever this machine's speed
            # (other work may share its cores); admission is tested on its own.
            "RIFFUSION_SESSION_ADMISSION": "cap",
        },
        seed_library_px=SMALL_CLIP_PX,
    ),
    # As README's web app section sets it up: no API key, the project's own seed images
    # (5.12 s clips): test_loadtest, test_prometheus_adapter, test_webapp.
    "open_server": ServedConfig({"RIFFUSION_API_KEY": None, "RIFFUSION_SEED_IMAGES_DIR": None}),
}


class SharedServers:
    """Starts each shared instance on first use, each in its own BENTOML_HOME."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._running: dict[str, LocalServer] = {}
        self._failed: dict[str, StartupError] = {}

    def get(self, name: str) -> LocalServer:
        if name in self._failed:  # do not wait out the start-up timeout once per module
            raise self._failed[name]
        server = self._running.get(name)
        if server is None:
            home = self._tmp_path_factory.mktemp(name)
            overrides = SHARED_CONFIGS[name].overrides(home)
            server = LocalServer(home / "serve.log", "tiny", overrides, READY_TIMEOUT_S)
            try:
                server.start()
            except StartupError as error:
                self._failed[name] = error
                raise
            self._running[name] = server
        elif server.process is None or server.process.poll() is not None:
            # An earlier module broke it: say so rather than restart and hide that.
            raise StartupError(f"the shared {name} exited; log: {server.log_path}")
        wait_idle(server.url, IDLE_TIMEOUT_S)  # zero on a fresh one, and before each module
        return server

    def stop(self, name: str) -> None:
        server = self._running.pop(name, None)
        if server is not None:
            server.stop()

    def stop_all(self) -> None:
        for name in list(self._running):
            self.stop(name)
