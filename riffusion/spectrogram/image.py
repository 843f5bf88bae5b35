"""Spectrogram images: mel amplitudes <-> uint8 pixels <-> PIL images with EXIF, and
audio <-> image.

Shapes follow the diffusers convention of naming tensors by their layout:
waveforms are ``(..., channels, samples)``, mel amplitudes are
``(..., channels, n_mels, frames)`` and pixels are ``(batch, 3, height, width)``.

Image encoding (exactly as the model's training data):

- encode: ``a / max`` where ``max`` is the clip's own largest mel amplitude
  (over all its channels, so stereo keeps the left/right balance), then
  ``^ power_for_image``, ``x 255``, ``255 - v`` and truncation to uint8; rows
  are flipped so the lowest mel bin is the bottom row. Mono writes the same
  value into R, G and B; stereo writes R = 0, G = left, B = right. The clip's
  ``max`` is recorded in EXIF tag 11080 for reference only, in riffusion's
  units: riffusion analyses samples scaled to 16-bit integers, so the max of
  this project's [-1, 1] samples is written x 32768 (see :mod:`riffusion.exif`).
- decode: ``((255 - p) / 255) ^ (1 / power_for_image) x params.max_value``
  with the *fixed* ``max_value`` (30e6): the image carries no absolute level,
  so callers normalise the reconstructed audio's loudness afterwards. Mono
  reads the mean of R, G and B (equal for images written here; averages the
  diffusion model's slight colour noise); stereo reads G and B.
  ``audio_from_image`` divides the reconstructed waveform by 32768 (the fixed
  scale matches 16-bit audio), so a loud image lands roughly in [-1, 1].

Pillow drops EXIF on ``save`` unless it is passed; ``encode_image`` passes it.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from riffusion.audio import Audio, AudioError
from riffusion.exif import INT16_FULL_SCALE, ExifTag
from riffusion.spectrogram.converter import get_converter
from riffusion.spectrogram.params import SpectrogramError, SpectrogramParams

# zlib level of the PNGs made here: on 512 px spectrograms level 3 takes a third to a half
# of the time of Pillow's default (6) and the files come out no larger (docs/benchmarks.md,
# "PNG encoding"); every generated clip is encoded once, on the model service's CPU.
PNG_COMPRESS_LEVEL = 3

# The fixed decode scale (max_value) corresponds to 16-bit audio (a full-scale
# int16 sine peaks near 36e6 in this STFT), so decoded waveforms are divided by
# INT16_FULL_SCALE to land roughly in [-1, 1], and audio is multiplied by it
# before analysis.


def pixels_from_mel_amplitudes(
    amplitudes: Tensor, params: SpectrogramParams = SpectrogramParams()
) -> Tensor:
    """(B, C, n_mels, W) mel amplitudes -> uint8 (B, 3, n_mels, W) pixels, rows flipped.

    Each clip is scaled by its own max (see the module docstring); C is 1 (mono)
    or 2 (stereo). An all-zero clip encodes as white (255).
    """
    if amplitudes.ndim != 4 or amplitudes.shape[1] not in (1, 2):
        raise SpectrogramError(
            f"amplitudes must be (batch, 1 or 2 channels, n_mels, width), "
            f"got shape {tuple(amplitudes.shape)}"
        )
    # Float64 keeps the transform bit-exact against a float64 reference.
    values = amplitudes.detach().to(torch.float64)
    if not torch.isfinite(values).all():
        raise SpectrogramError("amplitudes contain NaN or infinite values")
    if (values < 0).any():
        raise SpectrogramError("amplitudes must be non-negative")
    clip_max = values.amax(dim=(1, 2, 3), keepdim=True)
    scaled = values / torch.where(clip_max > 0, clip_max, torch.ones_like(clip_max))
    encoded = (255 - scaled.pow(params.power_for_image) * 255).to(torch.uint8)
    encoded = encoded.flip(-2)  # lowest mel bin at the bottom row
    if encoded.shape[1] == 1:
        return encoded.expand(-1, 3, -1, -1).contiguous()
    return torch.cat([torch.zeros_like(encoded[:, :1]), encoded], dim=1)


def mel_amplitudes_from_pixels(
    pixels: Tensor, params: SpectrogramParams = SpectrogramParams()
) -> Tensor:
    """uint8 (B, 3, H, W) pixels -> (B, C, H, W) float32 mel amplitudes scaled by params.max_value.

    C is 2 (G, B) when ``params.stereo`` else 1 (mean of R, G, B).
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise SpectrogramError(
            f"pixels must be (batch, 3, height, width), got {tuple(pixels.shape)}"
        )
    if pixels.dtype != torch.uint8:
        raise SpectrogramError(f"pixels must be uint8, got {pixels.dtype}")
    values = pixels.flip(-2).to(torch.float32)
    values = values[:, 1:3] if params.stereo else values.mean(dim=1, keepdim=True)
    return ((255 - values) / 255).pow(1 / params.power_for_image) * params.max_value


def image_from_mel_amplitudes(
    amplitudes: np.ndarray | Tensor, params: SpectrogramParams = SpectrogramParams()
) -> Image.Image:
    """(C, n_mels, W) mel amplitudes of audio with samples in [-1, 1] -> RGB spectrogram image
    with EXIF; tag 11080 holds their max in riffusion's units (int16-scaled samples: x 32768).
    """
    tensor = torch.as_tensor(amplitudes)
    if tensor.ndim != 3:
        raise SpectrogramError(
            f"amplitudes must be (channels, n_mels, width), got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] != params.num_channels:
        raise SpectrogramError(
            f"params.stereo={params.stereo} needs {params.num_channels} channel(s), "
            f"got {tensor.shape[0]}"
        )
    if tensor.shape[1] != params.num_frequencies:
        raise SpectrogramError(
            f"expected {params.num_frequencies} mel bins (params.num_frequencies), "
            f"got {tensor.shape[1]}"
        )
    pixels = pixels_from_mel_amplitudes(tensor[None], params)[0]
    return image_from_pixels(pixels, params, max_value=float(tensor.max()) * INT16_FULL_SCALE)


def image_from_pixels(pixels: Tensor, params: SpectrogramParams, max_value: float) -> Image.Image:
    """uint8 (3, H, W) pixels -> RGB image with the format's EXIF tags.

    ``max_value`` goes into tag 11080 as given: in riffusion's units (int16-scaled samples).
    """
    image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), mode="RGB")
    exif = image.getexif()
    for tag, value in params.to_exif(max_value=max_value).items():
        exif[tag] = value
    # Also in info, so copies of the image (which re-read info) keep the tags.
    image.info["exif"] = exif.tobytes()
    return image


def params_from_image(image: Image.Image) -> SpectrogramParams:
    """Spectrogram params from the image's EXIF tags (defaults for missing tags)."""
    return SpectrogramParams.from_exif(dict(image.getexif()))


def mel_amplitudes_from_image(
    image: Image.Image, params: SpectrogramParams | None = None
) -> tuple[Tensor, SpectrogramParams]:
    """Spectrogram image -> ((C, H, W) float32 mel amplitudes, params used).

    ``params`` defaults to the image's EXIF. The height must equal num_frequencies.
    """
    if params is None:
        params = params_from_image(image)
    if image.height != params.num_frequencies:
        raise SpectrogramError(
            f"image is {image.height} px high but the format has "
            f"{params.num_frequencies} mel bins (EXIF tag {ExifTag.NUM_FREQUENCIES.value})"
        )
    if image.width < 2:
        raise SpectrogramError(f"image is {image.width} px wide; need at least 2 columns")
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    return mel_amplitudes_from_pixels(pixels[None], params)[0], params


def image_from_audio(
    audio: Audio,
    params: SpectrogramParams | None = None,
    device: str | torch.device | None = None,
) -> Image.Image:
    """Audio -> spectrogram image with EXIF.

    ``params`` defaults to the standard format, stereo when the audio is. Audio
    is mixed down or duplicated to the channel count ``params`` asks for.
    """
    if params is None:
        params = SpectrogramParams(stereo=audio.channels == 2)
    if audio.sample_rate != params.sample_rate:
        raise AudioError(
            f"audio is {audio.sample_rate} Hz but the spectrogram format needs "
            f"{params.sample_rate} Hz; resample it first"
        )
    if audio.samples.ndim != 2 or audio.channels not in (1, 2):
        raise AudioError(
            f"audio must have 1 or 2 channels shaped (channels, frames), "
            f"got shape {audio.samples.shape}"
        )
    if audio.num_frames < 2:
        raise AudioError(f"audio has {audio.num_frames} samples; too short for a spectrogram")
    waveform = torch.from_numpy(np.ascontiguousarray(audio.samples, dtype=np.float32))
    if params.stereo and audio.channels == 1:
        waveform = waveform.expand(2, -1)
    elif not params.stereo and audio.channels == 2:
        waveform = waveform.mean(dim=0, keepdim=True)
    amplitudes = get_converter(params, device).mel_amplitudes_from_waveform(waveform)
    return image_from_mel_amplitudes(amplitudes.cpu(), params)


def audio_from_image(
    image: Image.Image,
    device: str | torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Audio:
    """Spectrogram image -> audio by inverse mel + Griffin-Lim, format read from EXIF.

    The waveform is decoded at the fixed scale and divided by 16-bit full scale,
    so a loud image lands roughly in [-1, 1]; normalise loudness afterwards.
    """
    amplitudes, params = mel_amplitudes_from_image(image)
    converter = get_converter(params, device)
    waveform = converter.waveform_from_mel_amplitudes(amplitudes, generator=generator)
    samples = (waveform / INT16_FULL_SCALE).cpu().numpy().astype(np.float32)
    return Audio(samples=samples, sample_rate=params.sample_rate)


def encode_image(image: Image.Image, format: str = "PNG") -> bytes:
    """PNG or JPEG bytes of a spectrogram image with its EXIF tags.

    Pillow's ``save`` drops EXIF unless it is passed explicitly; this passes it.
    """
    buffer = io.BytesIO()
    level = {"compress_level": PNG_COMPRESS_LEVEL} if format.upper() == "PNG" else {}
    image.save(buffer, format=format, exif=image.getexif(), **level)
    return buffer.getvalue()
