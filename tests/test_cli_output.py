"""CLI output does not depend on the terminal's width or the length of paths (issue 9, item 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from riffusion.audio import Audio, write_audio
from riffusion.cli import cli, model_commands  # model_commands attaches the commands

# The plan line is longer than this: a console that wraps would break it.
TERMINAL_COLUMNS = 80


def test_riff_plan_line_is_not_wrapped_for_a_long_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the missing model fails at once
    # An 80-column terminal, whatever this environment's COLUMNS: the console reads COLUMNS
    # when it is created (at import), so its width is pinned as well.
    monkeypatch.setenv("COLUMNS", str(TERMINAL_COLUMNS))
    monkeypatch.setattr(model_commands.stderr, "_width", TERMINAL_COLUMNS)
    assert model_commands.stderr.width == TERMINAL_COLUMNS
    # A folder that is no checkpoint: it passes the up-front model check and fails to load.
    (tmp_path / "no-model").mkdir()
    directory = tmp_path / ("d" * 120)
    directory.mkdir()
    source = directory / "in.wav"
    t = np.arange(int(1.5 * 44100)) / 44100
    write_audio(Audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], 44100), source)
    result = CliRunner().invoke(
        cli,
        # The model fails to load right after the plan line is printed: no model work needed.
        [
            "riff",
            str(source),
            "-o",
            str(tmp_path / "out.wav"),
            "--prompt",
            "harp",
            "--clip-duration",
            "0.72",
            "--overlap",
            "0.1",
            "--model",
            str(tmp_path / "no-model"),
        ],
    )
    lines = result.output.splitlines()
    assert len(str(source)) > TERMINAL_COLUMNS
    assert any(line.startswith(str(source)) and line.endswith("-> 3 clips") for line in lines), (
        result.output
    )
