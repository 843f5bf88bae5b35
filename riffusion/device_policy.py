"""One device policy: what a GPU does together and a CPU does one clip at a time.

A GPU runs a batch for about the price of one item and has its own cores, so it
decodes and vocodes a group of clips in one call each and overlaps that
post-processing with the next denoising steps. On a CPU every item costs as much
again, a batch's buffers outgrow the caches (Griffin-Lim item by item is about 2x
faster, VAE channels-last skips oneDNN's reorders) and a second thread competes
for the same cores: clips go one at a time, between steps, each answered as soon
as it is done. Denoising too: a GPU steps its jobs together, while a CPU's step
costs in proportion to its jobs, so sharing steps makes every clip late together and
one job at a time gives the best latency tail (the service's default batching on
each device follows this). Figures: docs/benchmarks.md ("Engine", "Image to audio",
"Hardening: memory per request", "CPU default batching").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from riffusion.contracts import PostProcessMode


@dataclass(frozen=True)
class DevicePolicy:
    """How work is grouped on one kind of device."""

    batch_together: bool  # decode, Griffin-Lim and answers of a group in one go
    postprocess: PostProcessMode  # the engine's default: "thread" overlaps it with steps
    vae_channels_last: bool  # VAE in channels-last memory format
    # Jobs share denoising steps (a running batch); False: one job at a time, which on a
    # CPU, where a step costs in proportion to its jobs, gives the best latency tail.
    denoise_together: bool


GPU_POLICY = DevicePolicy(
    batch_together=True, postprocess="thread", vae_channels_last=False, denoise_together=True
)
CPU_POLICY = DevicePolicy(
    batch_together=False, postprocess="inline", vae_channels_last=True, denoise_together=False
)


def device_policy(device: Any) -> DevicePolicy:
    """The policy for ``device`` (a torch.device or its name): CUDA batches, a CPU does not."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return GPU_POLICY if kind == "cuda" else CPU_POLICY
