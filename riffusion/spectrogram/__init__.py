"""The checkpoint's spectrogram format: audio <-> mel amplitudes <-> image.

The public face of the format; each concern lives in its own module:

- :mod:`riffusion.spectrogram.params`: ``SpectrogramParams`` (the format, its
  EXIF tags) and ``SpectrogramError``;
- :mod:`riffusion.spectrogram.converter`: ``SpectrogramConverter``, waveform <->
  mel amplitudes (forward mel, inverse mel, Griffin-Lim) on any device;
- :mod:`riffusion.spectrogram.stft`: the chunked STFT layout Griffin-Lim runs on;
- :mod:`riffusion.spectrogram.image`: mel amplitudes <-> pixels <-> images with
  EXIF (the encoding is described there), audio <-> image.
"""

from riffusion.exif import INT16_FULL_SCALE, ExifTag
from riffusion.spectrogram.converter import (
    PhaseGenerator,
    SpectrogramConverter,
    get_converter,
    resolve_device,
    spectral_convergence,
)
from riffusion.spectrogram.image import (
    audio_from_image,
    encode_image,
    image_from_audio,
    image_from_mel_amplitudes,
    image_from_pixels,
    mel_amplitudes_from_image,
    mel_amplitudes_from_pixels,
    params_from_image,
    pixels_from_mel_amplitudes,
)
from riffusion.spectrogram.params import SpectrogramError, SpectrogramParams

__all__ = [
    "INT16_FULL_SCALE",
    "ExifTag",
    "PhaseGenerator",
    "SpectrogramConverter",
    "SpectrogramError",
    "SpectrogramParams",
    "audio_from_image",
    "encode_image",
    "get_converter",
    "image_from_audio",
    "image_from_mel_amplitudes",
    "image_from_pixels",
    "mel_amplitudes_from_image",
    "mel_amplitudes_from_pixels",
    "params_from_image",
    "pixels_from_mel_amplitudes",
    "resolve_device",
    "spectral_convergence",
]
