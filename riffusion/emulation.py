"""An emulated accelerator: the real engine and pipeline, with an A10G's or H100's timing.

For benchmarks only (``RIFFUSION_EMULATE``; never the default, refused in a Bento unless
allowed). Everything but the accelerated calls runs for real (the tiny model's text
encoder, the schedulers, the engine and its post-processing thread, the services,
HTTP, MP3/JPEG encoding); those calls take the time a cost model of SD 1.5 at 512 px
in fp16 on that GPU gives (figures and sources: docs/benchmarks.md, "Emulated
accelerator"):

1. each accelerated call (UNet forward, seed-image VAE encode, VAE decode, Griffin-Lim)
   reserves its profile's time on ONE device timeline, first come first served:
   PyTorch's default CUDA stream runs the engine thread's steps and the
   post-processing thread's decodes one after the other, so a decode delays the next
   step as it would on the GPU;
2. the call computes outputs of the right shape and dtype (zeros from the UNet, random
   pixels, quiet noise: the JPEG and MP3 encoders downstream do their usual work), then
   sleeps until its reserved time ends. It does not run the tiny model's UNet, VAE or
   Griffin-Lim: on this CPU they take 10-100x the GPU time they would stand for (a
   5-step batch of 3 clips took 157 s under the H100 profile). A profile with
   ``runs_model=True`` runs them (to check that the wrapper changes no result); a call
   whose real computation outlasts its reservation is counted as an overrun;
3. the pipeline takes the GPU device policy: finished clips are decoded and vocoded
   together, on the engine's post-processing thread.

A cost is ``fixed + per_item * items * size``, ``size`` relative to the reference
shape: a UNet sample on 64 x 64 latents (two per job and step: classifier-free
guidance), a VAE image of 512 x 512 px, a Griffin-Lim clip of 512 frames (5.12 s).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from riffusion.device_policy import GPU_POLICY
from riffusion.latents import LATENT_CHANNELS
from riffusion.models import RiffusionComponents, load_components
from riffusion.pipeline import RiffusionPipeline
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import SpectrogramParams
from riffusion.unet_backends import UNetBackend, UNetFunction

logger = logging.getLogger(__name__)

EmulatedAccelerator = Literal["a10g", "h100", "zero"]
REFERENCE_LATENT_AREA = 64 * 64  # a 512 x 512 px image
REFERENCE_FRAMES = 512  # a 5.12 s clip


@dataclass(frozen=True)
class Cost:
    """Seconds of one call: ``fixed_s + per_item_s * items * size``."""

    fixed_s: float
    per_item_s: float

    def seconds(self, items: int, size: float = 1.0) -> float:
        return self.fixed_s + self.per_item_s * items * size


@dataclass(frozen=True)
class AcceleratorProfile:
    """What the model's compute costs on one accelerator (sources: docs/benchmarks.md)."""

    name: EmulatedAccelerator
    unet_step: Cost  # per UNet sample, 64 x 64 latents
    vae_encode: Cost  # per seed image, 512 x 512 px (at admission, on the engine thread)
    vae_decode: Cost  # per image, 512 x 512 px
    griffin_lim: Cost  # per clip, 512 frames, 32 iterations
    runs_model: bool = False  # True: the tiny model's real UNet, VAE and Griffin-Lim run too

    def describe(self) -> dict[str, Any]:
        return {
            "accelerator": self.name,
            "note": "EMULATED: not a GPU; the model's compute takes the time a cost model of "
            "this GPU gives, and its outputs are placeholders (docs/benchmarks.md)",
            **{
                f"{stage}_ms": {"fixed": cost.fixed_s * 1e3, "per_item": cost.per_item_s * 1e3}
                for stage, cost in (
                    ("unet_step", self.unet_step),
                    ("vae_encode", self.vae_encode),
                    ("vae_decode", self.vae_decode),
                    ("griffin_lim", self.griffin_lim),
                )
            },
            "runs_model": self.runs_model,
        }


# A10G: the UNet line fitted to the A10's 50-step fp16 runs at batch 4 and 16 (diffusers'
# torch 2.0 benchmark, SDPA); VAE decode: A100's full-minus-tiny VAE time, scaled by the
# A10/A100 UNet ratio; VAE encode: half the decode (an assumption: the encoder is the
# smaller half of the VAE); Griffin-Lim: an assumption from memory bandwidth.
# H100: fixed part from ONNX Runtime's 50-step H100 run, per-sample half the A100's (H100
# at 2x an A100, the low end of the published 2-3x); VAE decode half the A100's.
PROFILES: dict[str, AcceleratorProfile] = {
    "a10g": AcceleratorProfile(
        name="a10g",
        unet_step=Cost(fixed_s=0.0115, per_item_s=0.0236),
        vae_encode=Cost(fixed_s=0.002, per_item_s=0.054),
        vae_decode=Cost(fixed_s=0.002, per_item_s=0.108),
        griffin_lim=Cost(fixed_s=0.002, per_item_s=0.030),
    ),
    "h100": AcceleratorProfile(
        name="h100",
        unet_step=Cost(fixed_s=0.0034, per_item_s=0.00403),
        vae_encode=Cost(fixed_s=0.001, per_item_s=0.00925),
        vae_decode=Cost(fixed_s=0.001, per_item_s=0.0185),
        griffin_lim=Cost(fixed_s=0.001, per_item_s=0.006),
    ),
    # The model costs nothing: what the services themselves sustain.
    "zero": AcceleratorProfile(
        name="zero",
        unet_step=Cost(0.0, 0.0),
        vae_encode=Cost(0.0, 0.0),
        vae_decode=Cost(0.0, 0.0),
        griffin_lim=Cost(0.0, 0.0),
    ),
}


def get_profile(name: str) -> AcceleratorProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown emulated accelerator {name!r}; choose one of {list(PROFILES)}"
        ) from None


class DeviceClock:
    """One accelerator's timeline: calls from any thread take their time one after another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0  # time.monotonic() when the device's queued work ends
        self.calls = 0
        self.overruns = 0  # calls whose real computation outlasted their emulated time
        self.busy_s = 0.0  # emulated device seconds reserved so far

    def reserve(self, seconds: float) -> float:
        """Queue ``seconds`` of device work; returns the time.monotonic() at which it ends."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + seconds
            self.calls += 1
            self.busy_s += seconds
            return self._free_at

    def wait_until(self, end: float) -> None:
        """Sleep until ``end`` (counts an overrun if it has already passed)."""
        left = end - time.monotonic()
        if left < 0:
            with self._lock:
                self.overruns += 1
        while left > 0:
            time.sleep(left)
            left = end - time.monotonic()

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"calls": self.calls, "overruns": self.overruns, "busy_s": self.busy_s}


class EmulatedUNet:
    """A UNet backend in the profile's step time: ``(B,4,h,w), (B,), (B,T,D) -> (B,4,h,w)``."""

    def __init__(self, forward: UNetFunction, profile: AcceleratorProfile, clock: DeviceClock):
        self.forward = forward
        self.profile = profile
        self.clock = clock
        self.eager_calls = 0  # the eager-fallback metric reads it: never falls back

    def __call__(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        samples, _, height, width = latents.shape
        size = height * width / REFERENCE_LATENT_AREA
        end = self.clock.reserve(self.profile.unet_step.seconds(samples, size))
        if self.profile.runs_model:
            output = self.forward(latents, timesteps, text_embeddings)
        else:
            output = torch.zeros_like(latents)
        self.clock.wait_until(end)
        return output


class EmulatedPipeline(RiffusionPipeline):
    """``RiffusionPipeline`` on an emulated accelerator (see the module docstring)."""

    def __init__(
        self,
        components: RiffusionComponents,
        profile: AcceleratorProfile,
        unet_backend: UNetBackend = "eager",
        seed_images: SeedImageLibrary | None = None,
        spectrogram_params: SpectrogramParams | None = None,
    ) -> None:
        super().__init__(components, unet_backend, seed_images, spectrogram_params)
        self.profile = profile
        self.clock = DeviceClock()
        self.unet_forward = EmulatedUNet(self.unet_forward, profile, self.clock)
        # A GPU's grouping (decode and vocode together, post-processing on its own thread);
        # the tiny VAE keeps the memory format it was given for the CPU it really runs on.
        self.policy = dataclasses.replace(
            GPU_POLICY, vae_channels_last=self.policy.vae_channels_last
        )
        self._noise = torch.Generator("cpu").manual_seed(0)
        logger.warning(
            "EMULATED ACCELERATOR %s: model compute takes the time it would on that GPU "
            "(a cost model, docs/benchmarks.md); for benchmarks only, never for serving",
            profile.name.upper(),
        )

    def _seed_latents(self, key: str, image: PIL.Image.Image, seed: int) -> Tensor:
        """(1, 4, h, w) seed-image latents (cached as the real ones), in the encode time."""
        height, width = image.height // self.vae_scale_factor, image.width // self.vae_scale_factor

        def encode() -> Tensor:
            end = self.clock.reserve(
                self.profile.vae_encode.seconds(1, height * width / REFERENCE_LATENT_AREA)
            )
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn((1, LATENT_CHANNELS, height, width), generator=generator)
            self.clock.wait_until(end)
            return latents.to(self.device)

        if self.profile.runs_model:
            return super()._seed_latents(key, image, seed)
        return self.seed_latent_cache.get_or_compute((key, seed), encode)

    def decode_pixels(self, latents: Tensor) -> Tensor:
        """(B, 4, h, w) latents -> uint8 (B, 3, H, W) pixels, in the profile's decode time."""
        batch, _, height, width = latents.shape
        size = height * width / REFERENCE_LATENT_AREA
        end = self.clock.reserve(self.profile.vae_decode.seconds(batch, size))
        if self.profile.runs_model:
            pixels = super().decode_pixels(latents)
        else:  # random, not blank: the JPEG encoder downstream does its usual work
            scale = self.vae_scale_factor
            shape = (batch, 3, height * scale, width * scale)
            pixels = torch.randint(0, 256, shape, generator=self._noise, dtype=torch.uint8)
        self.clock.wait_until(end)
        return pixels

    def griffin_lim(
        self, pixels: Tensor, generators: Sequence[torch.Generator]
    ) -> list[np.ndarray]:
        """uint8 (B, 3, H, W) pixels -> B waveforms, in the profile's Griffin-Lim time."""
        batch, _, _, frames = pixels.shape
        end = self.clock.reserve(self.profile.griffin_lim.seconds(batch, frames / REFERENCE_FRAMES))
        if self.profile.runs_model:
            waveforms = super().griffin_lim(pixels, generators)
        else:  # quiet noise of the real length: the MP3 encoder does its usual work
            params = self.spectrogram_params
            shape = (2 if params.stereo else 1, (frames - 1) * params.hop_length)
            waveforms = [
                0.1 * torch.randn(shape, generator=generator).numpy() for generator in generators
            ]
        self.clock.wait_until(end)
        return waveforms

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "emulated": {**self.profile.describe(), **self.clock.stats()},
        }


def load_emulated(
    accelerator: str,
    model: str = "tiny",
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    unet_backend: UNetBackend = "eager",
) -> EmulatedPipeline:
    """``model`` (normally ``tiny``) on the CPU, timed as ``accelerator`` (a10g, h100, zero)."""
    profile = get_profile(accelerator)
    components = load_components(model, device=device or "cpu", dtype=dtype)
    return EmulatedPipeline(components, profile, unet_backend)
