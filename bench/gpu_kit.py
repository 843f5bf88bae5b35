"""The GPU kit: every GPU figure from one command, within 9 minutes, into one folder.

On a lent GPU machine (python3 with torch, torchaudio, transformers, scipy and pillow;
no network), from the repository root, with the wheels ``make gpu-wheels`` put in
``.whl/`` carried along::

    bash bench/gpu_kit.sh                  # writes into $OUT (or ./gpu-kit-out)

Back here with its files, ``python -m bench.gpu_digest OUT_DIR`` turns them into
Markdown for docs/benchmarks.md, the measured cost profile for riffusion/emulation.py
and the fastest UNet backend (bench/gpu_digest.py).

Here, on the CPU with the tiny model, the same stages at toy size (the suite runs this,
tests/test_gpu_kit.py, so the kit cannot rot)::

    uv run --frozen --all-extras python bench/gpu_kit.py --dry-run --out /tmp/kit

The stages, in order; each runs in its own process group under its own time budget
(killed at it, so a slow stage never starves the rest) and appends its output to
``kit.log``:

1. ``install``: the travelling wheels into a private folder (``pip --no-index``), put
   on PYTHONPATH for every later stage; skipped when ``.whl/`` is absent (the
   packages must then be there already: here, the project's venv);
2. ``env``: device, driver, versions -> ``env.json``;
3. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` -> ``cuda_tests.xml``;
4. ``pipeline``: bench/bench_pipeline_gpu.py (eager, traced, compiled at batches
   1-8, the plain diffusers img2img baseline, the FLOP floor) -> ``pipeline.jsonl``;
5. ``model``: the full-size architecture with random weights saved as a diffusers
   directory, so the served stages load what the checkpoint would cost;
6. ``serve``: one ``bentoml serve`` (both services, real HTTP) per batching mode,
   continuous and adaptive, shared by the two stages after it;
7. ``served``: bench.bench_engine open loop at 80 % of capacity, the web app's body
   (50 steps, denoising 0.75), continuous vs adaptive -> ``served.json``;
8. ``listeners``: load_tests.run, ``WebAppListener`` ramp per mode -> ``listeners.json``;
9. ``overhead``: with the servers stopped, bench/bench_engine_overhead.py on the device
   (the engine's and pipeline's own work per step, the UNet a 20 ms sleep, every
   other tensor on the GPU: what the GPU machine's host pays per step) ->
   ``overhead.jsonl``; last, in the time the others left.

``summary.json`` records each stage's status (ok, failed, timeout, skipped), seconds
and budget. Eight files in all (the lent machine returns at most 8).

What cannot travel: torch, CUDA and the other packages the machine already has
(they are used as found: torch 2.11 there, the project pins 2.10). Without locust
(its wheels did not fit, or are missing) the listener stage is skipped and says so.

Stdlib only at import time: the kit runs before the wheels are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
MAX_BATCH_SIZE = 8  # jobs per step in the served runs (the engine's default)
TOTAL_BUDGET_S = 540.0  # 9 minutes on the GPU machine
DRY_RUN_BUDGET_S = 1100.0  # the dry run on a loaded 2-core CPU
# Distributions the lent machine lacks (its image lists the rest): the project's own
# runtime, the serving stack and the load generator. ``make gpu-wheels`` downloads
# exactly the versions uv.lock pins. Checked closed: every requirement of these wheels
# (for CPython 3.12 on Linux) is among them or in the machine's image.
GPU_MISSING = (
    "diffusers",
    "soundfile",
    "cffi",
    "pycparser",
    "soxr",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pydantic-settings",
    "python-dotenv",
    "bentoml",
    "a2wsgi",
    "aiohttp-asgi-connector",
    "aiosqlite",
    "asgiref",
    "cattrs",
    "click-option-group",
    "httpx-ws",
    "importlib-metadata",
    "kantoku",
    "lazy-importer",
    "opentelemetry-api",
    "opentelemetry-instrumentation",
    "opentelemetry-instrumentation-aiohttp-client",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
    "opentelemetry-util-http",
    "pip-requirements-parser",
    "python-json-logger",
    "python-multipart",
    "pyzmq",
    "rich-toolkit",
    "schema",
    "simple-di",
    "starlette",
    "tomli-w",
    "tornado",
    "truststore",
    "uvicorn",
    "watchfiles",
    "wsproto",
    "httpx2",
    "httpcore2",
    "httpx2-jsfetch",
    "locust",
    "gevent",
    "geventhttpclient",
    "greenlet",
    "flask",
    "flask-cors",
    "flask-login",
    "blinker",
    "itsdangerous",
    "configargparse",
    "zope-event",
    "zope-interface",
    "brotli",
    "python-engineio",
    "python-socketio",
    "bidict",
    "simple-websocket",
)
WHEEL_BUDGET_BYTES = 56 * 2**20  # the tree and the wheels travel together in 64 MiB
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")


@dataclass
class Stage:
    name: str
    command: list[str]
    budget_s: float
    output: str | None = None  # file in the output folder the command's stdout goes to
    status: str = "pending"
    seconds: float = 0.0
    note: str = ""


@dataclass
class Kit:
    out: Path
    dry_run: bool
    env: dict[str, str]
    no_install: bool = False
    stages: list[Stage] = field(default_factory=list)

    @property
    def total_budget_s(self) -> float:
        return DRY_RUN_BUDGET_S if self.dry_run else TOTAL_BUDGET_S

    def log(self, text: str) -> None:
        with (self.out / "kit.log").open("a") as log:
            log.write(text if text.endswith("\n") else text + "\n")
        print(text, flush=True)

    def run(self, stage: Stage, began: float) -> None:
        """Run ``stage`` within its budget and what is left of the kit's total."""
        left = self.total_budget_s - (time.monotonic() - began)
        budget = min(stage.budget_s, left)
        self.stages.append(stage)
        if budget < 5:
            stage.status, stage.note = "skipped", "no time left"
            self.log(f"== {stage.name}: skipped (no time left)")
            return
        self.log(f"== {stage.name} (budget {budget:.0f} s): {' '.join(stage.command)}")
        started = time.monotonic()
        stdout_path = self.out / stage.output if stage.output else None
        with (self.out / "kit.log").open("a") as log:
            stdout = stdout_path.open("w") if stdout_path else log
            try:
                process = subprocess.Popen(
                    stage.command,
                    cwd=ROOT,
                    env=self.env,
                    stdout=stdout,
                    stderr=log,
                    start_new_session=True,  # its own process group: killed whole at the budget
                )
                try:
                    code = process.wait(timeout=budget)
                    stage.status = "ok" if code == 0 else "failed"
                    stage.note = "" if code == 0 else f"exit status {code}"
                except subprocess.TimeoutExpired:
                    _kill_group(process)
                    stage.status, stage.note = "timeout", f"killed at {budget:.0f} s"
            finally:
                if stdout_path:
                    stdout.close()
        stage.seconds = round(time.monotonic() - started, 1)
        self.log(f"== {stage.name}: {stage.status} in {stage.seconds} s {stage.note}")

    def skip(self, name: str, note: str) -> None:
        self.stages.append(Stage(name, [], 0.0, status="skipped", note=note))
        self.log(f"== {name}: skipped ({note})")

    def write_summary(self, began: float) -> None:
        summary = {
            "dry_run": self.dry_run,
            "seconds": round(time.monotonic() - began, 1),
            "budget_s": self.total_budget_s,
            "stages": [asdict(stage) for stage in self.stages],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the stage's process group (servers stop cleanly), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _python() -> str:
    return sys.executable


def _has_module(name: str, env: dict[str, str]) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([_python(), "-c", probe], env=env, cwd=ROOT).returncode == 0


ENV_PROBE = """
import importlib.metadata, json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info |= {"device": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
             "capability": f"{props.major}.{props.minor}"}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,"
            "clocks.max.sm,power.limit", "--format=csv,noheader"], capture_output=True,
            text=True, timeout=10).stdout.strip()
    except OSError:
        pass
# Installed versions, read without importing (locust's gevent patching fails after torch).
for name in ("diffusers", "transformers", "bentoml", "locust", "pydantic", "numpy"):
    try:
        info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        info[name] = "missing"
print(json.dumps(info, indent=2))
"""

SAVE_MODEL = """
import sys, torch
from bench.bench_pipeline_gpu import sd15_random_components
from riffusion.models import save_components
save_components(sd15_random_components(torch.device("cpu"), torch.float16), sys.argv[1])
"""


def serve_modes(
    kit: Kit,
    model: str,
    modes: list[str],
    budget_s: float,
    began: float,
    servers: contextlib.ExitStack,
) -> dict[str, str]:
    """Serve ``model`` once per batching mode (``bentoml serve``, both services), for the
    served and the listener stages alike; {} when a server does not come up in time."""
    from bench.bench_service import serve  # after the install stage: needs the wheels

    stage = Stage("serve", ["bentoml serve", model, *modes], budget_s)
    kit.stages.append(stage)
    started = time.monotonic()
    urls: dict[str, str] = {}
    try:
        for mode in modes:
            left = budget_s - (time.monotonic() - started)
            url = servers.enter_context(serve(model, MAX_BATCH_SIZE, mode, timeout_s=left))
            urls[mode] = url
            kit.log(f"   {mode} served at {url}")
        stage.status = "ok"
    except Exception as error:  # a server that does not start: the stages after it skip
        stage.status, stage.note = "failed", f"{type(error).__name__}: {error}"
        urls = {}
    stage.seconds = round(time.monotonic() - started, 1)
    kit.log(f"== serve: {stage.status} in {stage.seconds} s {stage.note}")
    return urls


def run_listeners(
    kit: Kit, urls: dict[str, str], dry: bool, steps: str, budget_s: float, began: float
) -> None:
    """The ``WebAppListener`` ramp against each mode's server -> ``listeners.json``."""
    listeners: dict[str, object] = {}
    users, run_time = ("2", "8s") if dry else ("40", "20s")
    with tempfile.TemporaryDirectory(prefix="gpu-kit-listeners-") as reports_dir:
        for mode, url in urls.items():
            report = Path(reports_dir) / mode
            command = [_python(), "-m", "load_tests.run", "--host", url, "-u", users]
            command += ["-r", users, "-t", run_time, "--user-class", "WebAppListener"]
            command += ["--shape", "ramp", "-o", str(report), "--num-inference-steps", steps]
            if dry:
                command += ["--playback-speed", "8"]
            kit.run(Stage(f"listeners_{mode}", command, budget_s), began)
            summary = report / "summary.json"
            listeners[mode] = json.loads(summary.read_text()) if summary.exists() else None
    (kit.out / "listeners.json").write_text(json.dumps(listeners, indent=2) + "\n")


def plan(kit: Kit, model_dir: Path) -> None:
    """Run every stage in order (install first when wheels travelled)."""
    began = time.monotonic()
    py = _python()
    dry = kit.dry_run
    # Budgets (s). On the GPU: 540 in all. Dry run: toy sizes, a couple of minutes.
    # The dry run's budgets hold on a 2-core machine at load average 12.
    budgets = (
        {"install": 60, "env": 90, "cuda_tests": 180, "pipeline": 400, "model": 30}
        | {"serve": 240, "served": 150, "listeners": 120, "overhead": 90}
        if dry
        else {"install": 40, "env": 15, "cuda_tests": 100, "pipeline": 120, "model": 45}
        | {"serve": 90, "served": 60, "listeners": 35}  # listeners: per mode
        | {"overhead": 45}  # last: in what the others left
    )

    if kit.no_install:
        kit.skip("install", "--no-install: using the packages installed")
    elif WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        site = Path(tempfile.mkdtemp(prefix="gpu-kit-site-"))
        wheels = sorted(str(path) for path in WHEELS.glob("*.whl"))
        kit.run(
            Stage(
                "install",
                [
                    py,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--no-cache-dir",
                    "--target",
                    str(site),
                    *wheels,
                ],
                budgets["install"],
            ),
            began,
        )
        kit.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
        # Console scripts (bentoml, locust) land in the target's bin/.
        kit.env["PATH"] = os.pathsep.join([str(site / "bin"), kit.env.get("PATH", "")])
        # The kit itself starts the servers (``serve_modes``): it needs them too.
        os.environ.update(PYTHONPATH=kit.env["PYTHONPATH"], PATH=kit.env["PATH"])
        sys.path[:0] = [str(ROOT), str(site)]
    else:
        kit.skip("install", f"no wheels in {WHEELS.name}/: using the packages installed")

    kit.run(Stage("env", [py, "-c", ENV_PROBE], budgets["env"], output="env.json"), began)

    junit = str(kit.out / "cuda_tests.xml")
    kit.run(
        Stage(
            "cuda_tests",
            [
                py,
                "-m",
                "pytest",
                "tests/test_cuda.py",
                "-m",
                "cuda",
                "-v",
                "-s",
                "-rA",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:locust",
                "--junitxml",
                junit,
            ],
            budgets["cuda_tests"],
        ),
        began,
    )

    pipeline = [py, "bench/bench_pipeline_gpu.py"]
    pipeline += (
        [
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "2",
            "--batches",
            "1",
            "2",
            "--backends",
            "eager",
            "--repeats",
            "1",
            "--griffin-lim-iters",
            "2",
        ]
        if dry
        else ["--batches", "1", "2", "4", "8", "--repeats", "2"]
    )
    kit.run(Stage("pipeline", pipeline, budgets["pipeline"], output="pipeline.jsonl"), began)

    if dry:
        model = "tiny"
        kit.skip("model", "dry run serves the tiny model")
    else:
        model = str(model_dir)
        kit.run(Stage("model", [py, "-c", SAVE_MODEL, model], budgets["model"]), began)

    steps = "2" if dry else "50"
    modes = ["continuous"] if dry else ["continuous", "adaptive"]
    with contextlib.ExitStack() as servers:
        urls = serve_modes(kit, model, modes, budgets["serve"], began, servers)
        if urls:
            run_served(kit, py, model, urls, dry, steps, budgets, began)
        else:
            kit.skip("served", "no server")
            kit.skip("listeners", "no server")

    # With the servers stopped, the host to itself: the engine's own work per step, the
    # UNet a 20 ms sleep and every other tensor on the device.
    overhead = [py, "-m", "bench.bench_engine_overhead", "--rounds", "1" if dry else "2"]
    overhead += (
        ["--device", "cpu", "--batches", "1", "--steps", "8", "--sizes", "8x8"]
        if dry
        else ["--device", "cuda", "--steps", "30", "--sizes", "64x64"]
    )
    kit.run(Stage("overhead", overhead, budgets["overhead"], output="overhead.jsonl"), began)
    kit.write_summary(began)


def run_served(
    kit: Kit,
    py: str,
    model: str,
    urls: dict[str, str],
    dry: bool,
    steps: str,
    budgets: dict[str, int],
    began: float,
) -> None:
    """The open loop and the listener ramp against the servers at ``urls``."""
    modes = list(urls)
    served = [py, "-m", "bench.bench_engine", "--model", model, "--modes", ",".join(modes)]
    served += ["--rounds", "1", "--abandon-clips", "0", "--steps", steps]
    served += [arg for mode, url in urls.items() for arg in ("--url", f"{mode}={url}")]
    # The dry run overloads on purpose: a few arrivals in a short window, whatever the
    # machine's capacity (about 6 expected on a loaded 2-core machine).
    served += (
        ["--loads", "4.0", "--seconds", "10", "--capacity-clips", "2"]
        if dry
        else ["--loads", "0.8", "--seconds", "20", "--capacity-clips", "8"]
    )
    served += ["--output", str(kit.out / "served.json")]
    kit.run(Stage("served", served, budgets["served"]), began)

    if not _has_module("locust", kit.env):
        kit.skip("listeners", "locust is not installed (its wheels did not travel)")
    else:
        run_listeners(kit, urls, dry, steps, budgets["listeners"], began)


def build_wheels(directory: Path) -> int:
    """Download the pinned wheels of ``GPU_MISSING`` for the lent machine (CPython 3.12,
    x86-64 manylinux) into ``directory``; fail when they outgrow ``WHEEL_BUDGET_BYTES``."""
    exported = subprocess.run(
        [
            "uv",
            "export",
            "--frozen",
            "--all-extras",
            "--no-hashes",
            "--no-emit-project",
            "--no-header",
            "--no-annotate",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins: dict[str, str] = {}
    for line in exported.splitlines():
        requirement = line.split(";")[0].strip()
        if "==" in requirement and not line.startswith((" ", "#")):
            name, version = requirement.split("==")
            pins[name.lower().replace("_", "-")] = version
    missing = [name for name in GPU_MISSING if name not in pins]
    if missing:
        print(f"not in uv.lock (skipped): {' '.join(missing)}")
    wanted = [f"{name}=={pins[name]}" for name in GPU_MISSING if name in pins]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms]
    command += ["-d", str(directory), *wanted]
    subprocess.run(command, check=True)
    sizes = sorted(((p.stat().st_size, p.name) for p in directory.glob("*.whl")), reverse=True)
    total = sum(size for size, _ in sizes)
    for size, name in sizes[:10]:
        print(f"{size / 2**20:6.2f} MiB  {name}")
    print(f"{len(sizes)} wheels, {total / 2**20:.1f} MiB (budget {WHEEL_BUDGET_BYTES / 2**20:.0f})")
    return 0 if total <= WHEEL_BUDGET_BYTES else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-kit-out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, toy sizes")
    parser.add_argument("--no-install", action="store_true", help="use the packages installed")
    parser.add_argument(
        "--build-wheels",
        type=Path,
        metavar="DIR",
        help="download the wheels for the lent machine into DIR and exit",
    )
    args = parser.parse_args()
    if args.build_wheels:
        return build_wheels(args.build_wheels)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if str(ROOT) not in sys.path:  # run as a script: the servers' helpers live in bench/
        sys.path.insert(0, str(ROOT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, even on a GPU
    kit = Kit(out=out, dry_run=args.dry_run, env=env, no_install=args.no_install)
    with tempfile.TemporaryDirectory(prefix="gpu-kit-model-") as model_dir:
        plan(kit, Path(model_dir))
    failed = [stage.name for stage in kit.stages if stage.status in ("failed", "timeout")]
    kit.log(f"kit done; failed or timed out: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
