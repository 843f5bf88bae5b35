"""The device policy decides what a device does together, and the serving defaults follow it."""

from __future__ import annotations

import pytest

from riffusion.device_policy import CPU_POLICY, GPU_POLICY, device_policy
from serving.settings import ServiceSettings, default_batching, engine_batch_size


@pytest.mark.parametrize(
    ("device", "policy"), [("cpu", CPU_POLICY), ("cuda", GPU_POLICY), ("cuda:1", GPU_POLICY)]
)
def test_a_gpu_works_together_and_a_cpu_one_clip_at_a_time(device: str, policy: object) -> None:
    assert device_policy(device) is policy


def test_unset_batching_is_the_devices_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the model service resolves it: continuous on a GPU, off (one clip) on a CPU."""
    monkeypatch.delenv("RIFFUSION_BATCHING", raising=False)
    assert ServiceSettings().batching is None
    assert default_batching(GPU_POLICY.denoise_together) == "continuous"
    assert default_batching(CPU_POLICY.denoise_together) == "off"
    assert ServiceSettings(batching="continuous").batching == "continuous"  # explicit wins


@pytest.mark.parametrize(
    ("batching", "max_batch_size", "jobs_per_step"),
    [("continuous", 8, 8), ("off", 8, 1), ("adaptive", 8, 8), ("adaptive", 1, 2)],
)
def test_jobs_per_step_follow_the_mode(
    batching: str, max_batch_size: int, jobs_per_step: int
) -> None:
    assert engine_batch_size(batching, max_batch_size) == jobs_per_step  # type: ignore[arg-type]
