"""The STFT layout Griffin-Lim works on, a chunk of frames at a time.

Spectra are (batch, frames, n_stft): the layout torch.stft computes in. The
transforms here compute the same rows torch.stft and torch.istft do, a range of
frames at a time, so Griffin-Lim (:mod:`riffusion.spectrogram.converter`) never
holds more than one chunk of FFT buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from riffusion.spectrogram.params import SpectrogramError, SpectrogramParams


@dataclass(frozen=True, eq=False)
class StftGrid:
    """One STFT layout (the format's, or the same frames at a lower sample rate).

    Spectra are (batch, frames, n_stft): the layout torch.stft computes in, so
    the Griffin-Lim loop makes no transposed copies. The transforms work on a
    range of frames at a time, so Griffin-Lim never holds more than one chunk
    of FFT buffers (see ``SpectrogramConverter._griffin_lim_on`` in
    :mod:`riffusion.spectrogram.converter`).
    """

    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    window: Tensor

    @classmethod
    def at_rate(cls, params: SpectrogramParams, rate: int, device: torch.device) -> StftGrid:
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

    def __init__(self, grid: StftGrid, batch: int, num_frames: int, device: torch.device):
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


class ChunkBuffers:
    """The Griffin-Lim loop's work buffers, sized for its largest chunk of frames and
    reused by every chunk and iteration: a loop that allocates them afresh for each
    chunk leaves the heap fragmented, tens of MB above what it holds
    (docs/benchmarks.md, "Hardening: memory per request")."""

    def __init__(self, grid: StftGrid, batch: int, chunk: int, bins: int, device: torch.device):
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
