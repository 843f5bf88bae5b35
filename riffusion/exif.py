"""The spectrogram EXIF tags, readable without torch (the CLI's ``print-exif`` uses this).

Tag 11080 holds the largest mel amplitude of the clip the image was made from,
in riffusion's units: the amplitude of the audio's samples scaled to 16-bit
integers (about 4.7e7 for a loud music clip). Images this project wrote before
it adopted those units hold the amplitude for samples in [-1, 1], 32768 times
less; :func:`source_max_value` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any

# Samples scaled to 16-bit integers: riffusion's analysis units.
INT16_FULL_SCALE = 32768.0


class ExifTag(IntEnum):
    """Integer EXIF tags carried by every spectrogram image."""

    SAMPLE_RATE = 11000
    STEREO = 11005
    STEP_SIZE_MS = 11010
    WINDOW_DURATION_MS = 11020
    PADDED_DURATION_MS = 11030
    NUM_FREQUENCIES = 11040
    MIN_FREQUENCY = 11050
    MAX_FREQUENCY = 11060
    POWER_FOR_IMAGE = 11070
    MAX_VALUE = 11080


def source_max_value(exif: Mapping[int, Any]) -> float | None:
    """Tag 11080 in riffusion's units (int16-scaled samples); None when absent or unusable.

    A value below 32768 is read as the older [-1, 1] units and scaled up: for
    samples in [-1, 1] the mel amplitude stays far below it (a full-scale sine
    gives about 1100), while in riffusion's units only audio quieter than
    about -63 dBFS would.
    """
    raw: Any = exif.get(ExifTag.MAX_VALUE.value)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    if not value >= 0:  # also NaN
        return None
    return value * INT16_FULL_SCALE if value < INT16_FULL_SCALE else value
