"""What tests, benchmarks and load tests do with a served instance, written once.

- ``web_app_body``: the riffusion web app's ``POST /run_inference/`` body, keys in the
  app's order (``ModelInference.runInference``);
- ``metric_samples`` / ``metric_total`` / ``histogram``: reading ``/metrics``;
- ``work_in_flight`` / ``wait_idle``: waiting until an instance has nothing to do.

Free of locust (which monkey-patches the standard library) and of torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

WEB_APP_STEPS = 50
WEB_APP_DENOISING = 0.75
WEB_APP_GUIDANCE = 7.0
DEFAULT_SEED_IMAGE_ID = "og_beat"
# Work in flight: clips the API service sent, engine jobs waiting or running.
BUSY_GAUGES = (
    "riffusion_clips_in_flight",
    "riffusion_engine_waiting_jobs",
    "riffusion_engine_running_jobs",
)


def prompt_input(
    prompt: str,
    seed: int,
    denoising: float = WEB_APP_DENOISING,
    guidance: float = WEB_APP_GUIDANCE,
) -> dict[str, Any]:
    """One end of the web app's interpolation, as it sends it."""
    return {"prompt": prompt, "seed": seed, "denoising": denoising, "guidance": guidance}


def web_app_body(
    alpha: float,
    start: dict[str, Any],
    end: dict[str, Any],
    steps: int = WEB_APP_STEPS,
    seed_image_id: str = DEFAULT_SEED_IMAGE_ID,
    mask_image_id: str | None = None,
) -> dict[str, Any]:
    """The web app's request body (``start``/``end`` from ``prompt_input``)."""
    return {
        "alpha": alpha,
        "num_inference_steps": steps,
        "seed_image_id": seed_image_id,
        "mask_image_id": mask_image_id,
        "start": dict(start),
        "end": dict(end),
    }


def metric_samples(url: str, headers: Mapping[str, str] | None = None) -> list[Sample]:
    """Every sample on ``url``'s ``/metrics``."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", headers=dict(headers or {}), timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric_total(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    return sum(
        sample.value
        for sample in metric_samples(url)
        if sample.name == name
        and all(sample.labels.get(key) == value for key, value in (labels or {}).items())
    )


def histogram(url: str, name: str) -> dict[str, float]:
    """{le: cumulative count} plus '_count' and '_sum' for one histogram, summed over labels."""
    values: dict[str, float] = {}
    for sample in metric_samples(url):
        if not sample.name.startswith(name):
            continue
        suffix = sample.name[len(name) :]
        if suffix == "_bucket":
            key = sample.labels["le"]
        elif suffix in ("_count", "_sum"):
            key = suffix
        else:
            continue
        values[key] = values.get(key, 0.0) + sample.value
    return values


def work_in_flight(url: str) -> dict[str, float]:
    """What the instance is still doing: the ``BUSY_GAUGES`` that are not zero, and the
    model service's calls in progress."""
    busy: dict[str, float] = {}
    for sample in metric_samples(url):
        model_calls = (
            sample.name == "bentoml_service_request_in_progress"
            and "riffusion_model" in sample.labels.values()
        )
        if (sample.name in BUSY_GAUGES or model_calls) and sample.value:
            busy[sample.name] = busy.get(sample.name, 0.0) + sample.value
    return busy


def wait_idle(url: str, timeout_s: float = 300.0, settle_s: float = 0.0) -> None:
    """Wait until the instance has had nothing in flight for ``settle_s``; AssertionError
    naming what is still busy after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    while True:
        busy = work_in_flight(url)
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        if quiet_since is not None and now - quiet_since >= settle_s:
            return
        if now > deadline:
            raise AssertionError(f"{url} still busy after {timeout_s:.0f} s: {busy}")
        time.sleep(0.5)
