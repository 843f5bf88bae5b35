"""The API service's process never imports torch, diffusers or transformers; the model
service's module exposes only the API its batching mode uses.

A fresh interpreter imports service.py and runs what the API service does with a
request (validation, audio-to-audio slicing, the model-service payloads both ways,
encoding the answer, mapping a failed job to its HTTP status), then lists the heavy
modules it loaded. The model service imports them in its ``__init__`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchaudio", "diffusers", "transformers")

API_PATH = """
import asyncio, json, sys
import numpy as np

import service
from riffusion.api_schemas import (
    InterpolateRequest, ModelAudio, ModelReply, ModelRequest, ModelResult,
    RunInferenceRequest, TextToAudioRequest, error_reply,
)
from riffusion.audio import Audio, encode_audio
from riffusion.contracts import JobExpired, JobFieldError, JobRefused
from riffusion.riff import interpolation_jobs, slice_riff, stitch_clips


web = RunInferenceRequest.model_validate(
    {"alpha": 0.5, "start": {"prompt": "(church bells:1.2)", "seed": 1},
     "end": {"prompt": "jazz", "seed": 2}, "seed_image_id": "og_beat"}
)
TextToAudioRequest.model_validate({"prompt": "lofi piano", "duration_s": 2})
interpolate = InterpolateRequest.model_validate(
    {"start": {"prompt": "a"}, "end": {"prompt": "b"}, "num_clips": 3, "seed_image_id": "og_beat"}
)
jobs = interpolation_jobs(interpolate.start, interpolate.end, 3, "og_beat")
t = np.arange(3 * 22050) / 22050
track = Audio(np.tile(0.3 * np.sin(2 * np.pi * 330 * t).astype(np.float32), (2, 1)), 22050)
plan = slice_riff(track, web.start, web.end, num_inference_steps=5)
request = ModelRequest(job=plan.jobs[0], submitted_at=0.0, job_id="a",
                       init_audio=ModelAudio.from_audio(plan.clips[0]))
echoed = ModelRequest.model_validate_json(request.model_dump_json())
assert np.array_equal(echoed.init_audio.audio().samples, plan.clips[0].samples)
result = ModelResult.from_parts(b"png", plan.clips[0], {"total": 1.0}, 1)
reply = ModelReply.model_validate_json(ModelReply(result=result).model_dump_json())
audio = stitch_clips([reply.result.audio()] * 2)
encode_audio(audio, "mp3")
statuses = [error_reply(e).error.status for e in
            (JobRefused("busy", 2.0), JobExpired("late"), JobFieldError("start.prompt", "long"))]
assert statuses == [503, 504, 400], statuses
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""


def run_python(code: str, **env: str) -> Any:
    """Run ``code`` in a fresh interpreter at the repository root; the JSON it printed last."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "RIFFUSION_MODEL": "tiny", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_api_path_imports_no_torch(tmp_path: Path) -> None:
    loaded = run_python(f"HEAVY = {HEAVY!r}\n{API_PATH}", BENTOML_HOME=str(tmp_path))
    assert loaded == []


def test_the_check_sees_torch_when_it_is_imported() -> None:
    """The check itself: the model side's modules do load torch."""
    code = (
        f"import json, sys\nHEAVY = {HEAVY!r}\nimport riffusion.engine\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))))"
    )
    assert "torch" in run_python(code)


@pytest.mark.parametrize(
    ("mode", "jobs_api"),
    [("continuous", "submit"), ("off", "submit"), ("adaptive", "submit_batch"), ("", "submit")],
)
def test_the_model_service_exposes_only_its_modes_api(mode: str, jobs_api: str) -> None:
    """One way in per mode: ``submit`` (the engine) or ``submit_batch`` (BentoML batches for it);
    listener sessions' places (``open_listener``, ``close_listener``) in every mode."""
    code = "import json, service; print(json.dumps(sorted(service.RiffusionModel.apis)))"
    apis = run_python(code, RIFFUSION_BATCHING=mode)
    assert apis == sorted(["cancel", "describe", "open_listener", "close_listener", jobs_api])
