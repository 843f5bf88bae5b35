"""A private temp folder per worker process; the folders of dead workers are removed.

BentoML's inter-service clients each make a temp folder (``bentoml-client-*``) that only
a clean close removes: a killed or restarted worker, and even a normal stop, left them
behind, empty, and an upload spooled to disk by a dying worker would stay too. So each
worker works under ``<tmp>/riffusion-worker-<pid>`` (Python's ``tempfile.tempdir``,
which everything in the process, BentoML included, asks for its temp files), and every
worker that starts removes the folders of workers no longer running: a restart cleans
up after the worker it replaces.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

PREFIX = "riffusion-worker-"


def use_private_temp_dir(root: str | Path | None = None) -> Path:
    """Point this process's temp files at its own folder under ``root`` (the system's
    temp folder by default), after removing the folders of dead workers there."""
    if root is None:
        current = Path(tempfile.gettempdir())
        # Called again in the same process (tests build services more than once).
        root = current.parent if current.name.startswith(PREFIX) else current
    root = Path(root)
    remove_dead_workers_temp(root)
    own = root / f"{PREFIX}{os.getpid()}"
    own.mkdir(mode=0o700, exist_ok=True)
    tempfile.tempdir = str(own)
    return own


def remove_dead_workers_temp(root: str | Path) -> list[Path]:
    """Remove the ``riffusion-worker-<pid>`` folders under ``root`` whose process is gone."""
    removed = []
    for path in Path(root).glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX)
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed the temp folders of dead workers: %s", [p.name for p in removed])
    return removed
