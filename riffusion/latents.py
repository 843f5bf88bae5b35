"""Latent-space helpers for the pipeline: seeded noise, interpolation, masks, pixels, caches."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

LATENT_CHANNELS = 4


def seeded_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise from ``seed``, drawn on the CPU in float32.

    Drawing on the CPU makes the noise independent of the device and of
    whatever else is in the batch; callers move it where it is needed.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def lerp(start: Tensor, end: Tensor, alpha: float) -> Tensor:
    """Linear interpolation that returns the endpoints exactly at alpha 0 and 1."""
    if alpha == 0.0:
        return start
    if alpha == 1.0:
        return end
    return start * (1.0 - alpha) + end * alpha


def slerp(start: Tensor, end: Tensor, alpha: float, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation between two noise tensors (linear when nearly parallel).

    Keeps the interpolated noise at the norm the model expects, where a plain
    lerp between independent Gaussians would shrink it by up to sqrt(2).
    """
    if alpha == 0.0:
        return start
    if alpha == 1.0:
        return end
    v0, v1 = start.double(), end.double()
    dot = float((v0 * v1).sum() / (v0.norm() * v1.norm()))
    if abs(dot) > dot_threshold:
        mixed = v0 * (1.0 - alpha) + v1 * alpha
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        mixed = v0 * (math.sin(theta * (1.0 - alpha)) / sin_theta) + v1 * (
            math.sin(theta * alpha) / sin_theta
        )
    return mixed.to(start.dtype)


def keep_mask_from_image(mask_image: Image.Image, latent_height: int, latent_width: int) -> Tensor:
    """Mask image -> (1, 1, h, w) float32 weights on the latent grid, 1 = keep the seed image.

    In the image white means repaint and black means keep; grey blends. The
    image is resized to the latent grid by area averaging.
    """
    gray = mask_image.convert("L").resize((latent_width, latent_height), Image.Resampling.BOX)
    repaint = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    return (1.0 - repaint)[None, None]


def pixels_to_model_input(image: Image.Image) -> Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def model_output_to_pixels(decoded: Tensor) -> Tensor:
    """VAE output (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), rounded."""
    return ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class LRUCache(Generic[K, V]):
    """A bounded least-recently-used cache with hit/miss counters."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        if key in self._entries:
            self.stats.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.stats.misses += 1
        value = compute()
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
