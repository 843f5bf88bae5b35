"""Each worker's temp files live in its own folder; a starting worker removes dead ones'."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.worker_temp import PREFIX, remove_dead_workers_temp, use_private_temp_dir


@pytest.fixture
def restore_tempdir() -> Iterator[None]:
    saved = tempfile.tempdir
    yield
    tempfile.tempdir = saved


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_dead_workers_folders_go_live_ones_and_others_stay(tmp_path: Path) -> None:
    dead = tmp_path / f"{PREFIX}{_dead_pid()}"
    (dead / "bentoml-client-x").mkdir(parents=True)
    (dead / "upload.wav").write_bytes(b"left by a killed worker")
    live = tmp_path / f"{PREFIX}{os.getpid()}"
    live.mkdir()
    other = tmp_path / "bentoml-uds-abc"
    other.mkdir()
    odd = tmp_path / f"{PREFIX}not-a-pid"
    odd.mkdir()

    assert remove_dead_workers_temp(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, odd.name])


@pytest.mark.usefixtures("restore_tempdir")
def test_temp_files_of_the_process_go_to_its_own_folder(tmp_path: Path) -> None:
    dead = tmp_path / f"{PREFIX}{_dead_pid()}"
    dead.mkdir()
    own = use_private_temp_dir(tmp_path)
    assert own == tmp_path / f"{PREFIX}{os.getpid()}" and not dead.exists()
    with tempfile.TemporaryDirectory(prefix="bentoml-client-") as made:
        assert Path(made).parent == own
    # Calling it again (a second service in the same process) does not nest folders.
    assert use_private_temp_dir() == own
