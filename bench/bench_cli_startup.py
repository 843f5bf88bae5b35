"""Start-up time of every ``riffusion`` command without a model, against importing torch.

For each command, measured in one run with the baseline interleaved:

- **cold**: wall time of the command in a fresh process (what a user waits for);
- **work**: the same command run again inside an interpreter that has already
  run it once, so every module it uses is imported; the project's own caches
  (``functools`` caches in ``riffusion.*``, e.g. the spectrogram converters) are
  emptied before each run, so set-up the work itself needs counts as work;
- **start-up** = cold - work, taken within each round: interpreter start,
  imports and the libraries' first-use set-up;
- **baseline**: wall time of ``python -c "import torch, torchaudio"``.

Each is timed as wall time and as CPU time (user + system, all threads). A
round runs the baseline, then each command cold and its work; start-up is
taken within a round and divided by that round's baseline, and the median over
``--repeats`` rounds is reported. On a shared machine CPU time is the figure
to judge by: wall time also counts waiting for the cores other work holds
(wall ratios varied by +-30 % between runs at load 2-5 on 2 cores).

Targets (issue 10 item 7): ``--help`` and ``print-exif`` finish (cold wall)
under 1 s, and no command's start-up CPU exceeds the baseline's by more than
``--tolerance`` of it (default 25 %). The margin holds the small libraries the
spectrogram commands' work needs on top of torch (click, Pillow with its EXIF
plugins, soundfile, soxr) and their first-use set-up; a library the work does
not need, such as diffusers and transformers (more than the baseline again),
does not fit. Which modules each command may import is asserted exactly by
``tests/test_cli_startup.py``; this script measures what it costs. Prints a
markdown table (for docs/benchmarks.md) and JSON; exit status 1 when a target
is missed.

    uv run --frozen --all-extras python bench/bench_cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = "python -c 'import torch, torchaudio'"
BASELINE_ARGS = [sys.executable, "-c", "import torch, torchaudio"]
# The absolute targets (cold wall time, seconds).
ABSOLUTE_TARGETS_S = {"help": 1.0, "print-exif": 1.0}
SPECTROGRAM_COLUMNS = 128  # 1.28 s of audio: the work stays small next to the start-up


class Timing(NamedTuple):
    wall_s: float
    cpu_s: float  # user + system time of the process, all its threads


@dataclass
class Row:
    name: str  # the command, or "help" for ``riffusion --help``
    args: list[str]
    cold: list[Timing] = field(default_factory=list)
    work: list[Timing] = field(default_factory=list)
    imports_torch: bool = False

    def startup(self, kind: int) -> list[float]:
        """Cold minus work per round (``kind``: 0 wall, 1 CPU); rounds share the load."""
        return [cold[kind] - work[kind] for cold, work in zip(self.cold, self.work, strict=True)]

    def startup_over(self, baseline: list[Timing], kind: int) -> float:
        """Median over rounds of start-up / that round's baseline."""
        pairs = zip(self.startup(kind), baseline, strict=True)
        return statistics.median(startup / base[kind] for startup, base in pairs)


def riffusion_executable() -> str:
    local = Path(sys.executable).parent / "riffusion"
    return str(local) if local.exists() else "riffusion"


def make_inputs(folder: Path) -> dict[str, Path]:
    """A short tone, a folder of two, a long one to cut, and a narrow spectrogram."""
    import numpy as np
    from PIL import Image

    from riffusion.audio import Audio, write_audio
    from riffusion.seed_images import SEED_IMAGES_DIR

    def tone(seconds: float, path: Path) -> Path:
        t = np.arange(round(seconds * 44100)) / 44100
        chord = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (220, 277.2, 329.6))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(Audio(np.stack([chord, 0.5 * chord]).astype(np.float32), 44100), path)
        return path

    clip_s = SPECTROGRAM_COLUMNS / 100
    seed_image = SEED_IMAGES_DIR / "og_beat.png"
    narrow = folder / "narrow.png"
    with Image.open(seed_image) as image:
        image.crop((0, 0, SPECTROGRAM_COLUMNS, image.height)).save(narrow, exif=image.getexif())
    for index in range(2):
        tone(clip_s, folder / "tones" / f"tone{index}.wav")
    return {
        "seed_image": seed_image,
        "narrow": narrow,
        "tone": folder / "tones" / "tone0.wav",
        "tones": folder / "tones",
        "long": tone(10.0, folder / "long.wav"),
        "out": folder / "out",
    }


def commands(files: dict[str, Path]) -> list[Row]:
    """Every command that runs no model, with inputs that keep its work small."""
    out = files["out"]
    device = ["--device", "cpu"]
    return [
        Row("help", ["--help"]),
        Row("print-exif", ["print-exif", str(files["seed_image"])]),
        Row("seed-images", ["seed-images"]),
        Row(
            "sample-clips",
            ["sample-clips", str(files["long"]), str(out / "clips"), "--duration", "1"],
        ),
        Row("audio-to-image", ["audio-to-image", str(files["tone"]), str(out / "a.png"), *device]),
        Row(
            "audio-to-images",
            ["audio-to-images", str(files["tones"]), str(out / "images"), *device],
        ),
        Row(
            "image-to-audio",
            ["image-to-audio", str(files["narrow"]), str(out / "narrow.wav"), *device],
        ),
        Row("make-seed-images", ["make-seed-images", str(out / "library")]),
    ]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(args: list[str]) -> Timing:
    cpu, began = children_cpu_s(), time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=REPO_ROOT)
    return Timing(time.perf_counter() - began, children_cpu_s() - cpu)


def measure_work(args: list[str]) -> tuple[Timing, bool]:
    """(in-process time of the command after a first run, whether torch was imported)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--work-of", json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return Timing(*report["timing"]), report["imports_torch"]


def run_work_in_this_process(args: list[str]) -> None:
    """The ``--work-of`` mode: run once (imports, first-use set-up), then time a second run."""
    from click.testing import CliRunner

    from riffusion.cli import cli

    def invoke() -> Timing:
        for name, module in list(sys.modules.items()):
            if name.startswith("riffusion"):
                for value in list(vars(module).values()):
                    clear = getattr(value, "cache_clear", None)  # functools caches
                    if callable(clear):
                        clear()
        cpu, began = time.process_time(), time.perf_counter()
        result = CliRunner().invoke(cli, args)
        timing = Timing(time.perf_counter() - began, time.process_time() - cpu)
        if result.exit_code != 0:
            raise SystemExit(f"riffusion {' '.join(args)} failed: {result.output}")
        return timing

    invoke()
    print(json.dumps({"timing": invoke(), "imports_torch": "torch" in sys.modules}))


WALL, CPU = 0, 1


def median(timings: list[Timing], kind: int) -> float:
    return statistics.median(timing[kind] for timing in timings)


def verdicts(rows: list[Row], baseline: list[Timing], tolerance: float) -> dict[str, str]:
    """'ok' or why a command misses a target."""
    found = {}
    for row in rows:
        problems = []
        limit, cold_s = ABSOLUTE_TARGETS_S.get(row.name), median(row.cold, WALL)
        if limit is not None and cold_s > limit:
            problems.append(f"cold {cold_s:.2f} s > {limit:g} s")
        if row.startup_over(baseline, CPU) > 1 + tolerance:
            problems.append(f"start-up CPU > baseline + {tolerance:.0%}")
        found[row.name] = "; ".join(problems) or "ok"
    return found


def markdown(rows: list[Row], baseline: list[Timing], verdict: dict[str, str]) -> str:
    wall, cpu = median(baseline, WALL), median(baseline, CPU)
    lines = [
        "| command | cold wall s | cold CPU s | work CPU s | start-up CPU s "
        "| start-up / baseline: CPU | wall | imports torch | target |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| `{BASELINE}` (baseline) | {wall:.2f} | {cpu:.2f} | | {cpu:.2f} | 1.00 | 1.00 | yes | |",
    ]
    for row in rows:
        lines.append(
            f"| `riffusion {row.args[0]}` | {median(row.cold, WALL):.2f} | "
            f"{median(row.cold, CPU):.2f} | {median(row.work, CPU):.2f} | "
            f"{statistics.median(row.startup(CPU)):.2f} | "
            f"{row.startup_over(baseline, CPU):.2f} | {row.startup_over(baseline, WALL):.2f} | "
            f"{'yes' if row.imports_torch else 'no'} | {verdict[row.name]} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.25,
        help="allowed start-up beyond the baseline, as a fraction of it",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="measure only these commands ('help': --help)"
    )
    parser.add_argument("--work-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.work_of is not None:
        run_work_in_this_process(json.loads(args.work_of))
        return 0

    riffusion = riffusion_executable()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = commands(make_inputs(Path(tmp)))
        if args.only:
            rows = [row for row in rows if row.name in args.only]
        baseline: list[Timing] = []
        for repeat in range(args.repeats):
            baseline.append(run_timed(BASELINE_ARGS))
            for row in rows:
                row.cold.append(run_timed([riffusion, *row.args]))
                work, row.imports_torch = measure_work(row.args)
                row.work.append(work)
            print(f"round {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    verdict = verdicts(rows, baseline, args.tolerance)
    print(markdown(rows, baseline, verdict))
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "python": platform.python_version(),
                "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
                "repeats": args.repeats,
                "tolerance": args.tolerance,
                "baseline": {"wall_s": median(baseline, WALL), "cpu_s": median(baseline, CPU)},
                "commands": {
                    row.name: {
                        "cold_wall_s": median(row.cold, WALL),
                        "cold_cpu_s": median(row.cold, CPU),
                        "work_wall_s": median(row.work, WALL),
                        "work_cpu_s": median(row.work, CPU),
                        "startup_over_baseline_cpu": row.startup_over(baseline, CPU),
                        "startup_over_baseline_wall": row.startup_over(baseline, WALL),
                        "imports_torch": row.imports_torch,
                        "verdict": verdict[row.name],
                    }
                    for row in rows
                },
            },
            indent=2,
        )
    )
    return 0 if all(value == "ok" for value in verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
