"""Deterministic drum-and-bass loop synthesis (numpy) for the seed-image library.

A :class:`LoopPattern` is written on a 16th-note grid, one string per bar and
instrument: drums, a bass line and an optional mallet voice (marimba or
vibraphone) that may play chords. :func:`synthesize_loop` renders it as an
exactly periodic loop: every hit's tail wraps around the loop end, so the audio
tiles seamlessly. All randomness (noise, velocity) comes from the pattern's own seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

from riffusion.audio import Audio

STEPS_PER_BEAT = 4  # 16th notes
HOLD, REST = "-", "."
CHORD = "+"  # joins the semitones of a chord in a melodic token, e.g. "0+4+7"
MalletVoice = Literal["marimba", "vibraphone"]


@dataclass(frozen=True)
class LoopPattern:
    """A groove of ``beats`` beats; each drum string covers one bar (``x`` hit, ``o`` open hat).

    ``bass`` holds one string per bar of space-separated tokens per step:
    a semitone offset from ``root_hz`` starts a note, ``-`` holds it and ``.``
    is silence. ``mallet`` is written the same way (semitones from
    ``mallet_root_hz``; ``0+4+7`` is a chord) and played by ``mallet_voice``.
    Bars cycle through the tuples when the loop has more bars.
    """

    beats: int
    beats_per_bar: int
    kick: tuple[str, ...]
    snare: tuple[str, ...]
    hats: tuple[str, ...]
    bass: tuple[str, ...]
    root_hz: float
    seed: int
    swing: float = 0.0  # fraction of a step that off-beat 16ths are delayed
    mallet: tuple[str, ...] = ()
    mallet_voice: MalletVoice = "marimba"
    mallet_root_hz: float = 440.0
    bass_level: float = 1.0

    def __post_init__(self) -> None:
        if self.beats % self.beats_per_bar:
            raise ValueError(f"{self.beats} beats is not a whole number of bars")
        steps = self.steps_per_bar
        for name in ("kick", "snare", "hats"):
            for bar in getattr(self, name):
                if len(bar) != steps:
                    raise ValueError(f"{name} bar {bar!r} needs {steps} steps")
        for name in ("bass", "mallet"):
            for bar in getattr(self, name):
                if len(bar.split()) != steps:
                    raise ValueError(f"{name} bar {bar!r} needs {steps} steps")

    @property
    def steps_per_bar(self) -> int:
        return self.beats_per_bar * STEPS_PER_BEAT

    @property
    def bars(self) -> int:
        return self.beats // self.beats_per_bar

    def tempo_bpm(self, loop_duration_s: Fraction) -> float:
        """The tempo that fits exactly ``beats`` beats into the loop."""
        return float(self.beats * 60 / loop_duration_s)


def _time(duration_s: float, sample_rate: int) -> np.ndarray:
    return np.arange(round(duration_s * sample_rate)) / sample_rate


def kick(sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Sine with a fast downward pitch sweep (120 -> 45 Hz) and a noise click."""
    t = _time(0.4, sample_rate)
    frequency = 45.0 + 85.0 * np.exp(-t / 0.03)
    body = np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate) * np.exp(-t / 0.13)
    click = rng.standard_normal(t.size) * np.exp(-t / 0.003) * 0.3
    return body + click


def snare(sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Two damped tones for the shell plus bright noise for the wires."""
    t = _time(0.3, sample_rate)
    shell = (np.sin(2 * np.pi * 185 * t) + 0.5 * np.sin(2 * np.pi * 330 * t)) * np.exp(-t / 0.05)
    wires = np.diff(rng.standard_normal(t.size + 1)) * np.exp(-t / 0.08)
    return 0.6 * shell + 0.5 * wires


def hat(sample_rate: int, rng: np.random.Generator, open_hat: bool) -> np.ndarray:
    """Twice-differentiated (high-passed) noise, short when closed, ringing when open."""
    t = _time(0.35 if open_hat else 0.08, sample_rate)
    noise = np.diff(rng.standard_normal(t.size + 2), n=2)
    return 0.12 * noise * np.exp(-t / (0.11 if open_hat else 0.014))


def bass_note(frequency: float, duration_s: float, sample_rate: int) -> np.ndarray:
    """Band-limited sawtooth (8 partials) with a plucked decay and 5 ms release."""
    t = _time(duration_s, sample_rate)
    partials = sum(np.sin(2 * np.pi * k * frequency * t) / k for k in range(1, 9))
    envelope = np.exp(-t / 0.35) * np.clip((duration_s - t) / 0.005, 0.0, 1.0)
    envelope *= np.clip(t / 0.003, 0.0, 1.0)  # 3 ms attack: no click
    return 0.5 * partials * envelope


def marimba_note(frequency: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A struck wooden bar: fundamental plus the tuned 4th and ~10th partials, fast decays,
    and a short mallet thump; it rings on its own whatever the written length."""
    t = _time(0.9, sample_rate)
    tone = (
        np.sin(2 * np.pi * frequency * t) * np.exp(-t / 0.28)
        + 0.35 * np.sin(2 * np.pi * 3.93 * frequency * t) * np.exp(-t / 0.06)
        + 0.12 * np.sin(2 * np.pi * 9.2 * frequency * t) * np.exp(-t / 0.02)
    )
    thump = rng.standard_normal(t.size) * np.exp(-t / 0.004) * 0.15
    return 0.45 * (tone + thump) * np.clip(t / 0.001, 0.0, 1.0)


def vibraphone_note(frequency: float, duration_s: float, sample_rate: int) -> np.ndarray:
    """A metal bar with the motor's tremolo: fundamental and 4th partial, a long ring
    damped (20 ms) at the end of the written length."""
    ring_s = duration_s + 0.02
    t = _time(ring_s, sample_rate)
    tone = np.sin(2 * np.pi * frequency * t) + 0.2 * np.sin(2 * np.pi * 4 * frequency * t) * np.exp(
        -t / 0.15
    )
    tremolo = 1.0 - 0.35 * (0.5 - 0.5 * np.cos(2 * np.pi * 5.5 * t))
    envelope = np.exp(-t / 1.6) * np.clip((ring_s - t) / 0.02, 0.0, 1.0)
    envelope *= np.clip(t / 0.002, 0.0, 1.0)
    return 0.3 * tone * tremolo * envelope


def _add_wrapped(loop: np.ndarray, sound: np.ndarray, start: int) -> None:
    """Mix ``sound`` into ``loop`` at ``start``, wrapping past the end to the start."""
    indices = (start + np.arange(sound.size)) % loop.size
    np.add.at(loop, indices, sound)


def _note_events(bars: tuple[str, ...], num_bars: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(start step, length in steps, semitones) of every note or chord across the loop."""
    if not bars:
        return []
    tokens = [token for bar in range(num_bars) for token in bars[bar % len(bars)].split()]
    events: list[tuple[int, int, tuple[int, ...]]] = []
    for step, token in enumerate(tokens):
        if token == HOLD and events and events[-1][0] + events[-1][1] == step:
            start, length, semitones = events[-1]
            events[-1] = (start, length + 1, semitones)
        elif token not in (HOLD, REST):
            events.append((step, 1, tuple(int(part) for part in token.split(CHORD))))
    return events


def synthesize_loop(
    pattern: LoopPattern, num_frames: int, sample_rate: int = 44100, peak: float = 0.9
) -> Audio:
    """Render ``pattern`` as a mono loop of exactly ``num_frames`` samples, peak-normalised."""
    total_steps = pattern.beats * STEPS_PER_BEAT
    rng = np.random.default_rng(pattern.seed)
    loop = np.zeros(num_frames, dtype=np.float64)
    step_frames = num_frames / total_steps

    def step_start(step: int) -> int:
        delay = pattern.swing if step % 2 else 0.0
        return round((step + delay) * step_frames)

    for step in range(total_steps):
        bar, position = divmod(step, pattern.steps_per_bar)
        velocity = 0.85 + 0.15 * rng.random()
        for grid, make in (
            (pattern.kick, lambda hit: kick(sample_rate, rng)),
            (pattern.snare, lambda hit: snare(sample_rate, rng)),
            (pattern.hats, lambda hit: hat(sample_rate, rng, open_hat=hit == "o")),
        ):
            hit = grid[bar % len(grid)][position]
            if hit != REST:
                _add_wrapped(loop, velocity * make(hit), step_start(step))
    for start, length, semitones in _note_events(pattern.bass, pattern.bars):
        duration_s = length * step_frames / sample_rate
        for semitone in semitones:
            frequency = pattern.root_hz * 2 ** (semitone / 12)
            note = pattern.bass_level * bass_note(frequency, duration_s, sample_rate)
            _add_wrapped(loop, note, step_start(start))
    for start, length, semitones in _note_events(pattern.mallet, pattern.bars):
        duration_s = length * step_frames / sample_rate
        for semitone in semitones:
            frequency = pattern.mallet_root_hz * 2 ** (semitone / 12)
            if pattern.mallet_voice == "marimba":
                note = marimba_note(frequency, sample_rate, rng)
            else:
                note = vibraphone_note(frequency, duration_s, sample_rate)
            _add_wrapped(loop, note / np.sqrt(len(semitones)), step_start(start))
    loop *= peak / np.max(np.abs(loop))
    return Audio(loop[None].astype(np.float32), sample_rate)
