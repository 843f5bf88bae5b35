"""Every batching mode runs its jobs through the model service's one path: the engine.

``continuous`` (a GPU's default) is served by the modules that test batching; here the
default on this CPU, ``off`` (the engine with a running batch of one: its best latency
tail, docs/benchmarks.md "CPU default batching"), and ``adaptive`` (BentoML's batches
entering the engine together), each on an instance of its own, answer concurrent clips,
count them in the engine's metrics; the API worker never maps torch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import psutil
import pytest

from load_tests.client import metric_total
from load_tests.server import LocalServer

READY_TIMEOUT_S = 600.0
CLIPS = 3


def _service_name(process: psutil.Process) -> str | None:
    command = process.cmdline()
    if "--service-name" not in command:
        return None
    return command[command.index("--service-name") + 1]


@pytest.mark.parametrize(("setting", "mode"), [(None, "off"), ("adaptive", "adaptive")])
def test_each_mode_answers_through_the_engine(
    tmp_path: Path, setting: str | None, mode: str
) -> None:
    """``setting`` unset: the device's default, ``off`` on a CPU."""
    env = {
        "RIFFUSION_BATCHING": setting,
        "RIFFUSION_API_KEY": None,
        "RIFFUSION_MAX_LATENCY_MS": "600000",  # adaptive: batch rather than refuse CPU clips
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "HF_HUB_OFFLINE": "1",
    }
    with LocalServer(tmp_path / "serve.log", "tiny", env, READY_TIMEOUT_S) as server:
        assert server.process is not None
        info = httpx.get(f"{server.url}/model_info", timeout=30).json()
        assert info["batching"] == mode

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                body = {"prompt": "lofi piano", "duration_s": 0.64, "num_inference_steps": 2}
                return await asyncio.gather(
                    *(
                        client.post("/text_to_audio", json={**body, "seed": seed})
                        for seed in range(CLIPS)
                    )
                )

        answers = asyncio.run(fire())
        assert [a.status_code for a in answers] == [200] * CLIPS, [a.text for a in answers]
        completed = metric_total(server.url, "riffusion_engine_jobs_total", {"event": "completed"})
        assert completed >= CLIPS  # every clip ran in the engine
        batch_sizes = [int(a.headers["X-Riffusion-Batch-Size"]) for a in answers]
        if mode == "off":
            assert batch_sizes == [1] * CLIPS  # a running batch of one
        # The served API worker, having answered, never loaded torch.
        api_worker = next(
            child
            for child in psutil.Process(server.process.pid).children(recursive=True)
            if _service_name(child) == "riffusion"
        )
        assert not [m.path for m in api_worker.memory_maps() if "libtorch" in m.path]
        log = (tmp_path / "serve.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
