"""Griffin-Lim in bounded memory: chunked transforms that give the whole-signal bits.

The model worker's memory per request (issue: no request raises a worker by more
than 300 MB; bench/bench_memory.py measures it served) came mostly from
Griffin-Lim's whole-signal buffers. These tests pin the pieces that bound it: the
overlap-add fed a chunk of frames at a time, the initial phase drawn without the
full-rate buffer, and the peak memory of one wide clip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil
import pytest
import torch

from riffusion.heap import release_freed_memory
from riffusion.spectrogram import SpectrogramConverter, SpectrogramParams
from riffusion.spectrogram.stft import StftGrid


def _fold_overlap_add(grid: StftGrid, frames: torch.Tensor) -> torch.Tensor:
    """The whole-signal overlap-add torch.istft does: one fold over all frames."""
    total = grid.win_length + grid.hop_length * (frames.shape[-2] - 1)
    summed = torch.nn.functional.fold(
        frames.transpose(-1, -2),
        output_size=(1, total),
        kernel_size=(1, grid.win_length),
        stride=(1, grid.hop_length),
    )
    start = grid.n_fft // 2 - grid.frame_offset
    return summed.reshape(frames.shape[0], total)[
        :, start : start + (frames.shape[-2] - 1) * grid.hop_length
    ]


@pytest.mark.parametrize(
    "params",
    [
        SpectrogramParams(),  # window 10 hops
        SpectrogramParams(window_duration_ms=25, padded_duration_ms=40),  # 2.5 hops
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_chunked_overlap_add_is_the_whole_fold_bit_for_bit(
    params: SpectrogramParams, chunk: int
) -> None:
    grid = StftGrid.at_rate(params, params.sample_rate, torch.device("cpu"))
    frames = torch.randn(2, 40, grid.win_length, generator=torch.Generator().manual_seed(3))
    summed = grid.overlap_add(2, 40)
    for first in reversed(range(0, 40, chunk)):
        summed.add(frames[:, first : first + chunk], first)
    assert torch.equal(summed.signal(None), _fold_overlap_add(grid, frames))


def test_overlap_add_refuses_chunks_in_an_order_that_would_change_the_sum() -> None:
    params = SpectrogramParams()
    grid = StftGrid.at_rate(params, params.sample_rate, torch.device("cpu"))
    frames = torch.randn(1, 40, grid.win_length)
    summed = grid.overlap_add(1, 40)
    with pytest.raises(ValueError, match="out of order"):
        summed.add(frames[:, :20], 0)  # first chunk first: fold sums the other way
    summed.add(frames[:, 20:], 20)
    with pytest.raises(ValueError, match="out of order"):
        summed.add(frames[:, :10], 0)  # a gap


@pytest.mark.parametrize("channels", [1, 2])
def test_initial_phase_is_the_full_draw_on_the_band_bins(channels: int) -> None:
    converter = SpectrogramConverter()
    band = converter.band_grid
    assert band is not None and converter._inverse_mel_in_band
    frames = 33
    full_generator = torch.Generator().manual_seed(9)
    full = torch.rand(
        (channels, converter.grid.n_stft, frames), generator=full_generator, dtype=torch.complex64
    )
    drawn = torch.empty(channels, frames, band.n_stft, dtype=torch.complex64)
    generator = torch.Generator().manual_seed(9)
    converter._draw_initial_phase(drawn, torch.Size([channels]), generator)
    assert torch.equal(drawn, full[:, : band.n_stft].transpose(-1, -2))
    # The generator ends where the full draw left it.
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=full_generator))


def _peak_rss_rise(work: Callable[[], object]) -> float:
    process = psutil.Process()
    release_freed_memory()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return (peak - before) / 2**20


def test_a_wide_clip_reconstructs_in_a_few_spectra_of_memory() -> None:
    converter = SpectrogramConverter(SpectrogramParams(num_griffin_lim_iters=1))
    mel = torch.rand(1, 1, 512, 2048, generator=torch.Generator().manual_seed(0)) * 1e6
    converter.waveform_from_mel_amplitudes(mel[..., :64], [torch.Generator()])  # warm-up
    rise_mb = _peak_rss_rise(
        lambda: converter.waveform_from_mel_amplitudes(mel, [torch.Generator().manual_seed(1)])
    )
    # At 2048 frames the previous STFT on the mel's 4001 bins is 66 MB, the magnitudes
    # 33 MB, one 2 MB chunk's buffers ~10 MB. Whole-signal transforms peaked at about
    # 925 MB, chunks with fresh buffers each and the full band grid's bins at 245-270 MB;
    # this loop measures 120-145 MB as RSS (the rise depends on what earlier tests left
    # in the allocator), so the bound leaves room for that and still catches a regression.
    assert rise_mb < 250, rise_mb


def test_bins_above_the_magnitudes_top_are_neither_stored_nor_needed() -> None:
    """The loop keeps only the bins below the highest non-zero one: same bits as all bins."""
    converter = SpectrogramConverter(SpectrogramParams(num_griffin_lim_iters=3))
    grid = converter.band_grid
    assert grid is not None
    magnitudes = torch.rand(2, 50, grid.n_stft, generator=torch.Generator().manual_seed(2))
    magnitudes[..., 4001:] = 0  # where inverse-mel output stops (10 kHz)

    def reconstruct(bins: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(4)
        top = magnitudes[..., :bins].contiguous()
        return converter._griffin_lim_on(grid, top, torch.Size([2]), generator)

    assert torch.equal(reconstruct(4001), reconstruct(grid.n_stft))
