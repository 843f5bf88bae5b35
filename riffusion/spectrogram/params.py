"""The spectrogram format's parameters (defaults: the checkpoint's training data) and its error."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from riffusion.exif import ExifTag


class SpectrogramError(ValueError):
    """Spectrogram data or parameters that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class SpectrogramParams:
    """Parameters of the spectrogram format (defaults: the checkpoint's training data)."""

    stereo: bool = False
    sample_rate: int = 44100
    step_size_ms: int = 10
    window_duration_ms: int = 100
    padded_duration_ms: int = 400
    num_frequencies: int = 512  # mel bins = image height
    min_frequency: int = 0
    max_frequency: int = 10000
    power_for_image: float = 0.25
    max_value: float = 30e6  # fixed decode scale (images carry no level)
    num_griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99

    def __post_init__(self) -> None:
        positive = {
            "sample_rate": self.sample_rate,
            "step_size_ms": self.step_size_ms,
            "window_duration_ms": self.window_duration_ms,
            "padded_duration_ms": self.padded_duration_ms,
            "num_frequencies": self.num_frequencies,
            "power_for_image": self.power_for_image,
            "max_value": self.max_value,
            "num_griffin_lim_iters": self.num_griffin_lim_iters,
        }
        for name, value in positive.items():
            if not value > 0:
                raise SpectrogramError(f"{name} must be positive, got {value!r}")
        if self.hop_length < 1:
            raise SpectrogramError(f"step_size_ms={self.step_size_ms} is under one sample")
        if self.window_duration_ms > self.padded_duration_ms:
            raise SpectrogramError(
                f"window_duration_ms ({self.window_duration_ms}) exceeds "
                f"padded_duration_ms ({self.padded_duration_ms})"
            )
        if not 0 <= self.min_frequency < self.max_frequency <= self.sample_rate / 2:
            raise SpectrogramError(
                f"need 0 <= min_frequency ({self.min_frequency}) < max_frequency "
                f"({self.max_frequency}) <= sample_rate / 2 ({self.sample_rate / 2})"
            )
        if not 0 <= self.griffin_lim_momentum < 1:
            raise SpectrogramError(
                f"griffin_lim_momentum must be in [0, 1), got {self.griffin_lim_momentum}"
            )

    @property
    def hop_length(self) -> int:
        return int(self.sample_rate * self.step_size_ms / 1000)

    @property
    def win_length(self) -> int:
        return int(self.sample_rate * self.window_duration_ms / 1000)

    @property
    def n_fft(self) -> int:
        return int(self.sample_rate * self.padded_duration_ms / 1000)

    @property
    def num_channels(self) -> int:
        return 2 if self.stereo else 1

    def to_exif(self, max_value: float | None = None) -> dict[int, int | float]:
        """EXIF tags for an image; ``max_value`` is the encoded clip's own max (tag 11080)."""
        return {
            ExifTag.SAMPLE_RATE.value: self.sample_rate,
            ExifTag.STEREO.value: int(self.stereo),
            ExifTag.STEP_SIZE_MS.value: self.step_size_ms,
            ExifTag.WINDOW_DURATION_MS.value: self.window_duration_ms,
            ExifTag.PADDED_DURATION_MS.value: self.padded_duration_ms,
            ExifTag.NUM_FREQUENCIES.value: self.num_frequencies,
            ExifTag.MIN_FREQUENCY.value: self.min_frequency,
            ExifTag.MAX_FREQUENCY.value: self.max_frequency,
            ExifTag.POWER_FOR_IMAGE.value: float(self.power_for_image),
            ExifTag.MAX_VALUE.value: float(self.max_value if max_value is None else max_value),
        }

    @classmethod
    def from_exif(cls, exif: Mapping[int, Any]) -> SpectrogramParams:
        """Params from EXIF tags, defaults for missing ones.

        Tag 11080 (the source clip's max) is not read back: decoding always
        uses the fixed ``max_value`` because images carry no absolute level
        (:func:`riffusion.exif.source_max_value` reads it, in either unit).
        """
        fields: dict[str, Any] = {}
        readers: dict[ExifTag, tuple[str, Any]] = {
            ExifTag.SAMPLE_RATE: ("sample_rate", int),
            ExifTag.STEREO: ("stereo", lambda v: bool(int(v))),
            ExifTag.STEP_SIZE_MS: ("step_size_ms", int),
            ExifTag.WINDOW_DURATION_MS: ("window_duration_ms", int),
            ExifTag.PADDED_DURATION_MS: ("padded_duration_ms", int),
            ExifTag.NUM_FREQUENCIES: ("num_frequencies", int),
            ExifTag.MIN_FREQUENCY: ("min_frequency", int),
            ExifTag.MAX_FREQUENCY: ("max_frequency", int),
            ExifTag.POWER_FOR_IMAGE: ("power_for_image", float),
        }
        for tag, (name, convert) in readers.items():
            if tag.value in exif:
                try:
                    fields[name] = convert(exif[tag.value])
                except (TypeError, ValueError) as error:
                    raise SpectrogramError(
                        f"EXIF tag {tag.value} ({name}) has unusable value {exif[tag.value]!r}"
                    ) from error
        return cls(**fields)

    def replace(self, **changes: Any) -> SpectrogramParams:
        return dataclasses.replace(self, **changes)
