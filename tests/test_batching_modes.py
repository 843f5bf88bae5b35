"""Every batching mode runs its jobs through the model service's one path: the engine.

``continuous`` is served by most test modules; here ``off`` (the engine with a running
batch of one) and ``adaptive`` (BentoML's batches entering the engine together), each
on an instance of its own, answer concurrent clips, count them in the engine's
metrics, and expose only the model-service API their mode uses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from load_tests.server import LocalServer

READY_TIMEOUT_S = 600.0
CLIPS = 3


def _completed_jobs(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "riffusion_engine_jobs":
            return sum(s.value for s in family.samples if s.labels.get("event") == "completed")
    return 0.0


@pytest.mark.parametrize("mode", ["off", "adaptive"])
def test_each_mode_answers_through_the_engine(tmp_path: Path, mode: str) -> None:
    env = {
        "RIFFUSION_BATCHING": mode,
        "RIFFUSION_API_KEY": None,
        "RIFFUSION_MAX_LATENCY_MS": "600000",  # adaptive: batch rather than refuse CPU clips
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "HF_HUB_OFFLINE": "1",
    }
    with LocalServer(tmp_path / "serve.log", "tiny", env, READY_TIMEOUT_S) as server:
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
        assert _completed_jobs(server.url) >= CLIPS  # every clip ran in the engine
        batch_sizes = [int(a.headers["X-Riffusion-Batch-Size"]) for a in answers]
        if mode == "off":
            assert batch_sizes == [1] * CLIPS  # a running batch of one
        log = (tmp_path / "serve.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    ("mode", "jobs_api"), [("continuous", "submit"), ("off", "submit"), ("adaptive", "generate")]
)
def test_the_model_service_exposes_only_its_modes_api(mode: str, jobs_api: str) -> None:
    import json
    import os
    import subprocess
    import sys

    code = "import json, service; print(json.dumps(sorted(service.RiffusionModel.apis)))"
    env = {**os.environ, "RIFFUSION_MODEL": "tiny", "RIFFUSION_BATCHING": mode}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == sorted(
        ["cancel", "describe", jobs_api]
    )
