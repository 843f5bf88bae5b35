"""The open-loop benchmark's window order (bench/bench_engine.py)."""

from __future__ import annotations

from bench.bench_engine import window_order


def test_no_window_follows_a_heavier_load() -> None:
    """BentoML's adaptive batcher carries the mean wait of a window over to the next one
    on the same server: a light window after a heavy one would measure that, not itself."""
    order = window_order([1.1, 0.5, 0.8], rounds=3, modes=["continuous", "adaptive"])
    loads = [load for _, load, _ in order]
    assert loads == sorted(loads)
    assert loads == [0.5] * 3 + [0.8] * 3 + [1.1] * 3
    assert [round_index for round_index, _, _ in order] == [0, 1, 2] * 3


def test_every_window_runs_every_mode_in_a_rotating_order() -> None:
    modes = ["continuous", "adaptive", "off"]
    order = window_order([0.5, 0.8], rounds=2, modes=modes)
    firsts = [turns[0] for _, _, turns in order]
    assert all(sorted(turns) == sorted(modes) for _, _, turns in order)
    assert firsts == ["continuous", "adaptive", "adaptive", "off"]
