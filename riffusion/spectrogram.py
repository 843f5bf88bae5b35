"""The checkpoint's spectrogram format: audio <-> mel amplitudes <-> image.

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

import dataclasses
import functools
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torchaudio.transforms as T
from PIL import Image
from torch import Tensor

from riffusion.audio import Audio, AudioError
from riffusion.device_policy import device_policy
from riffusion.exif import INT16_FULL_SCALE, ExifTag

# The fixed decode scale (max_value) corresponds to 16-bit audio (a full-scale
# int16 sine peaks near 36e6 in this STFT), so decoded waveforms are divided by
# INT16_FULL_SCALE to land roughly in [-1, 1], and audio is multiplied by it
# before analysis.
# Griffin-Lim's working rate keeps its Nyquist frequency this far above the mel
# band's top: measured spectral convergence is within 0.3 % of the full rate's
# at 1.5 (30 kHz for the default format), 1 % worse at 1.2.
BAND_RATE_HEADROOM = 1.5


# Frames per chunk of the Griffin-Lim loop are chosen so one chunk's real FFT input
# is about this size (its other buffers are a few times that). On a CPU 2 MB chunks
# ran a 20.48 s clip ~15 % faster than 8 MB ones (they stay in cache) and as fast at
# 5.12 s; a GPU takes far larger chunks (fewer kernel launches).
GRIFFIN_LIM_CHUNK_BYTES = {"cpu": 2 * 2**20, "cuda": 256 * 2**20}
# The initial phase is drawn in pieces of about this many complex numbers.
PHASE_PIECE = 1 << 18

# One generator for everything, or one per item of a batch's first dimension.
PhaseGenerator = torch.Generator | Sequence[torch.Generator] | None


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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; None picks CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def spectral_convergence(target: Tensor, estimate: Tensor) -> float:
    """``||target - estimate||_F / ||target||_F`` (0 is a perfect reconstruction)."""
    target64, estimate64 = target.double(), estimate.double()
    return float(
        torch.linalg.vector_norm(target64 - estimate64) / torch.linalg.vector_norm(target64)
    )


def _min_norm_inverse(forward: Tensor) -> Tensor:
    """Matrix X with X @ y the minimum-norm least-squares solution of forward @ x = y.

    This is the solution torchaudio's InverseMelScale finds with a fresh lstsq
    every call, computed once. The mel filter bank (n_mels, n_stft) is
    well-conditioned with full row rank, so forward^T (forward forward^T)^-1
    via Cholesky of the small Gram matrix is fast (much faster than an SVD
    pinv); pinv is the fallback for rank-deficient banks. Float64 for accuracy.
    """
    forward64 = forward.to(torch.float64)
    cholesky, info = torch.linalg.cholesky_ex(forward64 @ forward64.T)
    if int(info) == 0:
        inverse = torch.cholesky_solve(forward64, cholesky).T
    else:
        inverse = torch.linalg.pinv(forward64)
    return inverse.to(torch.float32).contiguous()


@dataclass(frozen=True, eq=False)
class _StftGrid:
    """One STFT layout (the format's, or the same frames at a lower sample rate).

    Spectra are (batch, frames, n_stft): the layout torch.stft computes in, so
    the Griffin-Lim loop makes no transposed copies. The transforms work on a
    range of frames at a time, so Griffin-Lim never holds more than one chunk
    of FFT buffers (see ``SpectrogramConverter._griffin_lim_on``).
    """

    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    window: Tensor

    @classmethod
    def at_rate(cls, params: SpectrogramParams, rate: int, device: torch.device) -> _StftGrid:
        scale = rate / params.sample_rate
        win_length = round(params.win_length * scale)
        return cls(
            sample_rate=rate,
            n_fft=round(params.n_fft * scale),
            win_length=win_length,
            hop_length=round(params.hop_length * scale),
            window=torch.hann_window(win_length, device=device),
        )

    @property
    def n_stft(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def frame_offset(self) -> int:
        """Where the window (``win_length``, centred) starts inside an ``n_fft`` frame."""
        return (self.n_fft - self.win_length) // 2

    def pad(self, waveform: Tensor) -> Tensor:
        """(batch, samples) -> the reflect-padded signal torch.stft frames (center=True)."""
        half = self.n_fft // 2
        return torch.nn.functional.pad(waveform[:, None], (half, half), mode="reflect")[:, 0]

    def analyse(self, padded: Tensor, first: int, count: int, frames: Tensor) -> Tensor:
        """Complex (batch, count, n_stft): frames ``first..first + count - 1`` of the STFT of
        the signal ``padded`` came from; the rows torch.stft computes (same windowed frames,
        same FFT), a chunk at a time. ``frames`` is a zeroed (batch, >= count, n_fft) buffer
        reused from chunk to chunk: only each frame's window part is written."""
        offset = self.frame_offset
        start = first * self.hop_length + offset
        length = (count - 1) * self.hop_length + self.win_length
        segments = padded[:, start : start + length].unfold(-1, self.win_length, self.hop_length)
        frames = frames[:, :count]
        torch.mul(segments, self.window, out=frames[..., offset : offset + self.win_length])
        return torch.fft.rfft(frames)

    def synthesise(self, spectrum: Tensor) -> Tensor:
        """Complex (batch, count, n_stft) frames -> their windowed inverse FFTs,
        (batch, count, win_length), for ``OverlapAdd``.

        torch.istft overlap-adds whole ``n_fft`` frames although the window
        (``win_length``, centred in the frame) zeroes all but a quarter of each;
        only that part is kept, the same sum at a quarter of the work.
        """
        offset = self.frame_offset
        frames = torch.fft.irfft(spectrum, n=self.n_fft)[..., offset : offset + self.win_length]
        return frames.mul_(self.window)

    def overlap_add(self, batch: int, num_frames: int) -> OverlapAdd:
        """An empty overlap-add of ``num_frames`` frames (see ``OverlapAdd``)."""
        return OverlapAdd(self, batch, num_frames, self.window.device)

    def window_envelope(self, num_frames: int) -> Tensor:
        """Sum of squared windows under each output sample (the istft normaliser)."""
        summed = self.overlap_add(1, num_frames)
        summed.add(self.window.square().expand(1, num_frames, -1), 0)
        envelope = summed.signal(None)[0]
        if bool((envelope < 1e-11).any()):
            raise SpectrogramError("window overlap leaves gaps; step_size_ms is too large")
        return envelope


class OverlapAdd:
    """The overlap-add of an inverse STFT, fed a chunk of frames at a time, last chunk first.

    Each frame's window part is added a hop at a time straight into the signal, so
    no frame is kept. torch.istft's overlap-add (``fold``) sums each sample's
    frames in order of the sample's offset inside them, the latest frame first;
    hop by hop, with chunks fed from the last to the first, keeps that order, so
    the sum is the same bits as one fold over all frames.
    """

    def __init__(self, grid: _StftGrid, batch: int, num_frames: int, device: torch.device):
        self.grid = grid
        self.num_frames = num_frames
        self.hops_per_window = math.ceil(grid.win_length / grid.hop_length)
        blocks = num_frames + self.hops_per_window - 1
        self.summed = torch.zeros(batch, blocks * grid.hop_length, device=device)
        self._next_last = num_frames  # chunks must come last first

    def add(self, frames: Tensor, first: int) -> None:
        """Windowed frames ``first..first + count - 1``, (batch, count, win_length), where
        ``first + count`` is the first frame of the chunk added before (or all frames)."""
        count, hop = frames.shape[-2], self.grid.hop_length
        if first + count != self._next_last:
            raise ValueError(f"frames {first}..{first + count - 1} out of order")
        self._next_last = first
        blocks = self.summed.view(self.summed.shape[0], -1, hop)  # (batch, blocks, hop)
        for shift in range(self.hops_per_window):
            part = frames[..., shift * hop : (shift + 1) * hop]
            blocks[:, first + shift : first + shift + count, : part.shape[-1]] += part

    def signal(self, envelope: Tensor | None) -> Tensor:
        """(batch, (frames - 1) * hop): the centred signal, divided by ``envelope`` if given."""
        grid = self.grid
        # center=True: the signal starts n_fft // 2 into the padded frame grid.
        start = grid.n_fft // 2 - grid.frame_offset
        signal = self.summed[:, start : start + (self.num_frames - 1) * grid.hop_length]
        return signal if envelope is None else signal / envelope


class _ChunkBuffers:
    """The Griffin-Lim loop's work buffers, sized for its largest chunk of frames and
    reused by every chunk and iteration: a loop that allocates them afresh for each
    chunk leaves the heap fragmented, tens of MB above what it holds
    (docs/benchmarks.md, "Hardening: memory per request")."""

    def __init__(self, grid: _StftGrid, batch: int, chunk: int, bins: int, device: torch.device):
        self.batch, self.bins, self.n_stft = batch, bins, grid.n_stft
        # The STFT's input frames; zeros outside each frame's window part (see ``analyse``).
        self.frames = torch.zeros(batch, chunk, grid.n_fft, device=device)
        # The next spectrum, for the inverse FFT; only its lowest ``bins`` bins are written.
        self._spectrum = torch.zeros(batch * chunk * grid.n_stft, 2, device=device)
        self._scale = torch.empty(batch * chunk * bins, device=device)

    def spectrum(self, count: int) -> tuple[Tensor, Tensor]:
        """Complex (batch, count, n_stft) and a real (batch, count, bins, 2) view of its
        lowest bins, where the update is written."""
        size = self.batch * count * self.n_stft
        spectrum = self._spectrum[:size].view(self.batch, count, self.n_stft, 2)
        return torch.view_as_complex(spectrum), spectrum[:, :, : self.bins]

    def scale(self, count: int) -> Tensor:
        """Real (batch, count, bins): the phase update's per-bin scale."""
        return self._scale[: self.batch * count * self.bins].view(self.batch, count, self.bins)


def _occupied_bins(values: Tensor, dim: int) -> int:
    """How many of the lowest bins (indices along ``dim``) hold every non-zero value (>= 1)."""
    others = tuple(d for d in range(values.ndim) if d != dim % values.ndim)
    occupied = values.ne(0).any(dim=others).nonzero()
    return int(occupied[-1]) + 1 if len(occupied) else 1


def _band_rate(params: SpectrogramParams) -> int | None:
    """Lowest sample rate that holds the mel band with margin and keeps the STFT's layout.

    The mel scale stops at ``max_frequency``, so the inverse-mel magnitudes are
    zero above it and Griffin-Lim can run at a lower rate with the same frame
    times and the same bin frequencies (rate / n_fft is unchanged), in FFTs of
    a fraction of the size. Hop, window and FFT sizes must stay whole samples,
    which holds at multiples of sample_rate / gcd(hop, window, n_fft). None
    when no such rate is below the format's own.
    """
    step = math.gcd(params.hop_length, params.win_length, params.n_fft)
    unit = params.sample_rate / step
    needed = 2 * BAND_RATE_HEADROOM * params.max_frequency
    for multiple in range(math.ceil(needed / unit), step):
        rate = unit * multiple
        if rate.is_integer():
            return int(rate)
    return None


class SpectrogramConverter:
    """Waveform <-> mel amplitudes on torchaudio transforms, built once per (params, device).

    The inverse mel is the least-squares (minimum-norm) solution, computed as a
    precomputed pseudo-inverse of the filter bank instead of a solve per call;
    negative bins are clamped to 0. Griffin-Lim is batched over every leading
    dimension, draws its random initial phase from ``generator`` so
    reconstructions reproduce, and runs at the lowest sample rate that holds
    the mel band (see ``griffin_lim``).
    """

    def __init__(
        self,
        params: SpectrogramParams = SpectrogramParams(),
        device: str | torch.device = "cpu",
        *,
        band_rate: bool = True,
    ) -> None:
        self.params = params
        self.device = torch.device(device)
        self.spectrogram = T.Spectrogram(
            n_fft=params.n_fft,
            win_length=params.win_length,
            hop_length=params.hop_length,
            window_fn=torch.hann_window,
            power=1.0,
            center=True,
            pad_mode="reflect",
            onesided=True,
        ).to(self.device)
        self.mel_scale = T.MelScale(
            n_mels=params.num_frequencies,
            sample_rate=params.sample_rate,
            f_min=float(params.min_frequency),
            f_max=float(params.max_frequency),
            n_stft=params.n_fft // 2 + 1,
            norm=None,
            mel_scale="htk",
        ).to(self.device)
        self.inverse_mel_matrix = _min_norm_inverse(self.mel_scale.fb.T)  # (n_stft, n_mels)
        self.window: Tensor = self.spectrogram.window
        self.grid = _StftGrid.at_rate(params, params.sample_rate, self.device)
        # band_rate=False keeps Griffin-Lim at the format's rate (for comparisons).
        rate = _band_rate(params) if band_rate else None
        self.band_grid = _StftGrid.at_rate(params, rate, self.device) if rate else None
        self.band_resample = (
            T.Resample(orig_freq=rate, new_freq=params.sample_rate).to(self.device)
            if rate
            else None
        )
        # The inverse mel's rows above the mel band's top bin are exactly zero (the mel
        # scale stops there), so mel input goes straight to the band grid, and
        # Griffin-Lim keeps only the bins up to that top one (see ``_griffin_lim_on``).
        self._mel_bins = _occupied_bins(self.inverse_mel_matrix, dim=0)
        self._inverse_mel_in_band = (
            self.band_grid is not None and self._mel_bins <= self.band_grid.n_stft
        )

    @property
    def n_mels(self) -> int:
        return self.params.num_frequencies

    @torch.inference_mode()
    def mel_amplitudes_from_waveform(self, waveform: Tensor) -> Tensor:
        """(..., channels, samples) float -> (..., channels, n_mels, frames) mel amplitudes."""
        if waveform.ndim < 2:
            raise SpectrogramError(
                f"waveform must be (..., channels, samples), got shape {tuple(waveform.shape)}"
            )
        if waveform.shape[-1] < 2:
            raise SpectrogramError(f"waveform has {waveform.shape[-1]} samples; need at least 2")
        waveform = waveform.to(self.device, torch.float32)
        # Reflect padding needs more samples than half the FFT size.
        pad = self.params.n_fft // 2
        if waveform.shape[-1] <= pad:
            waveform = torch.nn.functional.pad(waveform, (0, pad + 1 - waveform.shape[-1]))
        return self.mel_scale(self.spectrogram(waveform))

    @torch.inference_mode()
    def linear_amplitudes_from_mel(self, amplitudes: Tensor) -> Tensor:
        """(..., n_mels, frames) -> (..., n_stft, frames): least-squares inverse mel, >= 0."""
        self._check_mel_shape(amplitudes)
        amplitudes = amplitudes.to(self.device, torch.float32)
        return torch.matmul(self.inverse_mel_matrix, amplitudes).clamp_(min=0)

    @torch.inference_mode()
    def waveform_from_mel_amplitudes(
        self, amplitudes: Tensor, generator: PhaseGenerator = None
    ) -> Tensor:
        """(..., channels, n_mels, frames) -> (..., channels, (frames - 1) * hop), Griffin-Lim.

        The inverse mel goes straight into Griffin-Lim's layout on the band grid
        (its rows above the band are exactly zero), so the full-rate linear
        spectrogram is never built.
        """
        self._check_mel_shape(amplitudes)
        per_item = generator is not None and not isinstance(generator, torch.Generator)
        if per_item and not device_policy(self.device).batch_together and amplitudes.dim() > 3:
            # On a CPU a whole batch's FFT buffers outgrow the caches: item by item is
            # about 2x faster (docs/benchmarks.md). A GPU takes the batch in one go.
            generators = list(cast("Sequence[torch.Generator]", generator))
            if len(generators) != amplitudes.shape[0]:
                raise SpectrogramError(
                    f"got {len(generators)} generators for a batch of {amplitudes.shape[0]}; "
                    "give one per item of the first dimension"
                )
            return torch.cat(
                [
                    self._waveform_from_mel(item[None], [item_generator])
                    for item, item_generator in zip(amplitudes, generators, strict=True)
                ]
            )
        return self._waveform_from_mel(amplitudes, generator)

    def _waveform_from_mel(self, amplitudes: Tensor, generator: PhaseGenerator) -> Tensor:
        leading = amplitudes.shape[:-2]
        mel = amplitudes.reshape(-1, *amplitudes.shape[-2:]).to(self.device, torch.float32)
        grid = self.band_grid if self._inverse_mel_in_band else self.grid
        assert grid is not None
        # (batch, frames, n_mels) @ (n_mels, bins): the frames-major layout, one buffer.
        bins = self._mel_bins  # within either grid: the band grid is used only if it holds them
        magnitudes = torch.matmul(mel.transpose(-1, -2), self.inverse_mel_matrix[:bins].T)
        magnitudes.clamp_(min=0)
        if grid is not self.grid:
            magnitudes.mul_(grid.win_length / self.grid.win_length)
        del mel
        waveform = self._griffin_lim_on(grid, magnitudes, leading, generator)
        return self._to_format_rate(grid, waveform).reshape(*leading, -1)

    @torch.inference_mode()
    def griffin_lim(self, magnitudes: Tensor, generator: PhaseGenerator = None) -> Tensor:
        """Fast Griffin-Lim (momentum) on (..., n_stft, frames) magnitudes -> (..., samples).

        The iteration and the random initial phase are torchaudio's
        ``GriffinLim`` (rand_init: real and imaginary parts uniform in [0, 1)),
        except that the initial phase comes from ``generator`` rather than the
        global RNG, so a reconstruction reproduces. A sequence of generators,
        one per item of the first dimension, gives each item of a batch the
        phase it would get alone, so its audio does not depend on its batch-mates.

        Faster than torchaudio's loop at the same convergence:

        - magnitudes that are zero above the band rate's Nyquist frequency (all
          inverse-mel output: the mel scale stops at max_frequency) are
          reconstructed at that lower rate (see ``_band_rate``), in FFTs about
          half the size, then resampled to the format's rate;
        - the phase update is fused into real-valued in-place ops;
        - the inverse STFT overlap-adds only the window's non-zero samples.

        Memory: see ``_griffin_lim_on``.
        """
        leading = magnitudes.shape[:-2]
        magnitudes = magnitudes.reshape(-1, *magnitudes.shape[-2:]).to(self.device, torch.float32)
        if magnitudes.shape[-2] != self.grid.n_stft:
            raise SpectrogramError(
                f"magnitudes must have {self.grid.n_stft} frequency bins, "
                f"got shape {tuple(magnitudes.shape)}"
            )
        grid = self.grid
        band = self.band_grid
        bins = _occupied_bins(magnitudes, dim=1)
        magnitudes = magnitudes[:, :bins]
        if band is not None and bins <= band.n_stft:
            grid = band
            # Same bins (and the same initial phase on them); a window of
            # fewer samples sums to proportionally less.
            magnitudes = magnitudes * (band.win_length / self.grid.win_length)
        magnitudes = magnitudes.transpose(-1, -2).contiguous()  # (batch, frames, bins)
        waveform = self._griffin_lim_on(grid, magnitudes, leading, generator)
        return self._to_format_rate(grid, waveform).reshape(*leading, -1)

    def _to_format_rate(self, grid: _StftGrid, waveform: Tensor) -> Tensor:
        if grid is self.grid:
            return waveform
        assert self.band_resample is not None
        length = (waveform.shape[-1] // grid.hop_length) * self.params.hop_length
        return self.band_resample(waveform)[..., :length]

    def _griffin_lim_on(
        self,
        grid: _StftGrid,
        magnitudes: Tensor,
        leading: torch.Size,
        generator: PhaseGenerator,
    ) -> Tensor:
        """The momentum iteration on one grid: (batch, frames, bins) -> (batch, samples).

        ``magnitudes`` holds the grid's lowest ``bins`` bins; the bins above are zero.
        A zero magnitude zeroes its bin of every iteration's spectrum whatever the
        phase, so those bins are neither stored nor updated: the inverse FFT pads
        them with zeros (for mel input, the third of the band grid above the mel
        scale's top).

        Memory: the loop works a chunk of frames at a time, fusing each iteration's
        STFT, phase update, inverse FFT and overlap-add, so besides the magnitudes it
        holds one complex spectrum of ``bins`` (the previous STFT, for the momentum;
        the initial phase before that), the signal and one chunk's buffers, where
        whole-signal transforms held about a dozen full-rate spectra. The result is
        the same bits as the whole-signal loop (docs/benchmarks.md, "Hardening:
        memory per request").
        """
        p = self.params
        batch, num_frames, bins = magnitudes.shape
        envelope = grid.window_envelope(num_frames)
        momentum = p.griffin_lim_momentum / (1 + p.griffin_lim_momentum)
        chunk = self._chunk_frames(batch, grid)
        # Last chunk first: the order ``OverlapAdd`` sums in.
        chunks = [
            (first, min(chunk, num_frames - first))
            for first in reversed(range(0, num_frames, chunk))
        ]
        work = _ChunkBuffers(grid, batch, chunk, bins, magnitudes.device)

        # 1. The initial phase, kept as the "previous" spectrum (a (..., 2) real view).
        previous = torch.empty(batch, num_frames, bins, 2, device=magnitudes.device)
        self._draw_initial_phase(torch.view_as_complex(previous), leading, generator)
        summed = grid.overlap_add(batch, num_frames)
        for first, count in chunks:
            part = slice(first, first + count)
            spectrum, update = work.spectrum(count)
            torch.mul(previous[:, part], magnitudes[:, part, :, None], out=update)
            summed.add(grid.synthesise(spectrum), first)
        waveform = summed.signal(envelope)

        # 2. Each iteration: the waveform's STFT, the momentum phase update, the inverse.
        for iteration in range(p.num_griffin_lim_iters):
            padded = grid.pad(waveform)
            summed = grid.overlap_add(batch, num_frames)
            for first, count in chunks:
                part = slice(first, first + count)
                stft = grid.analyse(padded, first, count, work.frames)
                rebuilt = torch.view_as_real(stft[..., :bins])
                spectrum, update = work.spectrum(count)
                # angles = rebuilt - momentum * previous (zero before the first STFT),
                # normalised to unit modulus and scaled by the target magnitude, all
                # in place on the (..., 2) real view.
                if iteration == 0:
                    update.copy_(rebuilt)
                else:
                    torch.sub(rebuilt, previous[:, part], alpha=momentum, out=update)
                previous[:, part] = rebuilt
                del stft, rebuilt
                scale = work.scale(count)
                torch.abs(torch.view_as_complex(update), out=scale).add_(1e-16)
                torch.div(magnitudes[:, part], scale, out=scale)
                update.mul_(scale.unsqueeze(-1))
                summed.add(grid.synthesise(spectrum), first)
            waveform = summed.signal(envelope)
        return waveform

    def _chunk_frames(self, batch: int, grid: _StftGrid) -> int:
        """Frames per chunk of the Griffin-Lim loop: one chunk's real FFT input is about
        ``GRIFFIN_LIM_CHUNK_BYTES`` for the device."""
        budget = GRIFFIN_LIM_CHUNK_BYTES.get(self.device.type, GRIFFIN_LIM_CHUNK_BYTES["cpu"])
        return max(1, budget // (4 * batch * grid.n_fft))

    def _draw_initial_phase(
        self, out: Tensor, leading: torch.Size, generator: PhaseGenerator
    ) -> None:
        """Fill complex ``out`` (batch, frames, bins) with torchaudio's rand_init draw
        for the full-rate (..., n_stft, frames) shape, restricted to its lowest bins.

        A generator yields the same numbers drawn in pieces as at once, so each channel's
        block is drawn a few rows at a time (transposed into ``out``), and the rows above
        ``bins`` are drawn and dropped, leaving the generator where the full draw
        would: the same phase as one full draw, without its memory.
        """
        if generator is None or isinstance(generator, torch.Generator):
            generators = [generator]
            per_generator = math.prod(leading)
        else:
            generators = list(generator)
            if not leading or len(generators) != leading[0]:
                raise SpectrogramError(
                    f"got {len(generators)} generators for a batch of shape {tuple(leading)}; "
                    "give one per item of the first dimension"
                )
            per_generator = math.prod(leading[1:])
        num_frames, bins = out.shape[-2:]
        rows = max(1, PHASE_PIECE // num_frames)
        skipped = (self.grid.n_stft - bins) * num_frames
        item = 0
        for item_generator in generators:
            # Drawn on the generator's own device, so a CPU generator works with CUDA.
            device = item_generator.device if item_generator is not None else self.device
            for _ in range(per_generator):
                for row in range(0, bins, rows):
                    piece = torch.rand(
                        (min(rows, bins - row), num_frames),
                        generator=item_generator,
                        device=device,
                        dtype=torch.complex64,
                    )
                    out[item, :, row : row + piece.shape[0]] = piece.T
                for begin in range(0, skipped, PHASE_PIECE):
                    torch.rand(
                        min(PHASE_PIECE, skipped - begin),
                        generator=item_generator,
                        device=device,
                        dtype=torch.complex64,
                    )
                item += 1

    def _check_mel_shape(self, amplitudes: Tensor) -> None:
        if amplitudes.ndim < 2 or amplitudes.shape[-2] != self.n_mels:
            raise SpectrogramError(
                f"mel amplitudes must be (..., {self.n_mels}, frames), "
                f"got shape {tuple(amplitudes.shape)}"
            )
        # The reconstructed waveform must be longer than half an FFT for reflect padding.
        min_frames = self.params.n_fft // (2 * self.params.hop_length) + 2
        if amplitudes.shape[-1] < min_frames:
            raise SpectrogramError(
                f"need at least {min_frames} frames (pixels) to reconstruct audio, "
                f"got {amplitudes.shape[-1]}"
            )


@functools.lru_cache(maxsize=8)
def _cached_converter(params: SpectrogramParams, device: torch.device) -> SpectrogramConverter:
    return SpectrogramConverter(params, device)


def get_converter(
    params: SpectrogramParams = SpectrogramParams(), device: str | torch.device | None = None
) -> SpectrogramConverter:
    """A shared converter for (params, device); built once, then reused with its precomputed state.

    Only the channel-independent fields matter, so ``stereo`` is ignored in the cache key.
    """
    return _cached_converter(params.replace(stereo=False), resolve_device(device))


# --- image encoding -----------------------------------------------------------------------------


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
    image.save(buffer, format=format, exif=image.getexif())
    return buffer.getvalue()
