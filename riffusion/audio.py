"""Audio file I/O and editing on numpy arrays (soundfile; no ffmpeg)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class AudioError(ValueError):
    """Audio input that cannot be used; the message names the problem."""


@dataclass
class Audio:
    """A waveform: float32 samples shaped (channels, frames) at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.sample_rate
