"""Waveform <-> mel amplitudes: the forward mel spectrogram, the inverse mel and
Griffin-Lim, on any torch device.

Shapes follow the diffusers convention of naming tensors by their layout:
waveforms are ``(..., channels, samples)`` and mel amplitudes are
``(..., channels, n_mels, frames)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import cast

import torch
import torchaudio.transforms as T
from torch import Tensor

from riffusion.device_policy import device_policy
from riffusion.progress import report as report_progress
from riffusion.spectrogram.params import SpectrogramError, SpectrogramParams
from riffusion.spectrogram.stft import ChunkBuffers, StftGrid

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
        self.grid = StftGrid.at_rate(params, params.sample_rate, self.device)
        # band_rate=False keeps Griffin-Lim at the format's rate (for comparisons).
        rate = _band_rate(params) if band_rate else None
        self.band_grid = StftGrid.at_rate(params, rate, self.device) if rate else None
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
        self._check_mel(amplitudes)
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
        self._check_mel(amplitudes)
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
        _check_precision(magnitudes, "magnitudes")
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

    def _to_format_rate(self, grid: StftGrid, waveform: Tensor) -> Tensor:
        if grid is self.grid:
            return waveform
        assert self.band_resample is not None
        length = (waveform.shape[-1] // grid.hop_length) * self.params.hop_length
        return self.band_resample(waveform)[..., :length]

    def _griffin_lim_on(
        self,
        grid: StftGrid,
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
        work = ChunkBuffers(grid, batch, chunk, bins, magnitudes.device)

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
            report_progress("griffin-lim", iteration + 1, p.num_griffin_lim_iters)
        return waveform

    def _chunk_frames(self, batch: int, grid: StftGrid) -> int:
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

    def _check_mel(self, amplitudes: Tensor) -> None:
        _check_precision(amplitudes, "mel amplitudes")
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


def _check_precision(values: Tensor, name: str) -> None:
    """Amplitudes in half precision, or non-finite ones, are refused.

    The policy: post-processing (inverse mel, Griffin-Lim, loudness) runs in float32
    whatever dtype the model runs in. Amplitudes reach the decode scale ``max_value``
    (30e6), past float16's largest value (65504), and bfloat16 keeps 8 bits of
    mantissa: a half-precision input has already lost what Griffin-Lim needs, so it
    is named here rather than turned into silent or NaN audio.
    """
    if values.dtype in (torch.float16, torch.bfloat16):
        raise SpectrogramError(
            f"{name} are {values.dtype}; post-processing takes float32 (the decode scale "
            "overflows float16): convert pixels with mel_amplitudes_from_pixels"
        )
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise SpectrogramError(f"{name} contain NaN or infinite values")


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
