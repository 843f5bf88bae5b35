"""Start-up time of the ``riffusion`` command, against importing torch.

Runs each command ``--repeats`` times in a fresh process and prints the median
wall time. Targets: ``--help`` and ``print-exif`` under 1 s; audio commands no
slower than ``import torch, torchaudio`` plus their own work.

    uv run --frozen --all-extras python bench/bench_cli_startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def riffusion_executable() -> str:
    local = Path(sys.executable).parent / "riffusion"
    return str(local) if local.exists() else "riffusion"


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    riffusion = riffusion_executable()
    seed_image = str(REPO_ROOT / "seed_images" / "og_beat.png")
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "python -c 'import torch, torchaudio'": [
                sys.executable,
                "-c",
                "import torch, torchaudio",
            ],
            "riffusion --help": [riffusion, "--help"],
            "riffusion print-exif og_beat.png": [riffusion, "print-exif", seed_image],
            "riffusion seed-images": [riffusion, "seed-images"],
            "riffusion image-to-audio og_beat.png out.wav": [
                riffusion,
                "image-to-audio",
                seed_image,
                str(Path(tmp) / "out.wav"),
                "--device",
                "cpu",
            ],
            "riffusion text-to-audio --help (imports diffusers)": [
                riffusion,
                "text-to-audio",
                "--help",
            ],
        }
        results = {
            name: median_seconds(command, args.repeats) for name, command in commands.items()
        }
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_average_1m": os.getloadavg()[0],
                "repeats": args.repeats,
                "median_seconds": {name: round(value, 2) for name, value in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
