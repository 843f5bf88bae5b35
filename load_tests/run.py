"""Headless load-test runner: ``python -m load_tests.run`` (``make loadtest LOADTEST_ARGS=...``).

Starts a local server with the tiny model unless ``--host`` is given, runs locust
headless with bounded users and run time, stops everything it started (also on
Ctrl-C), scrapes ``/metrics`` before and after, and writes into one folder:
locust's CSV files and HTML report, ``chart.png``, ``summary.md`` and ``summary.json``.

Exit status: 0 = run done and thresholds met; 1 = a threshold was exceeded (each
one is printed); 2 = the run itself failed (bad option, server or locust error);
130 = interrupted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType

import click
import httpx
from rich.console import Console

from load_tests.report import threshold_options, write_report
from load_tests.report_parse import CSV_PREFIX, METRICS_AFTER, METRICS_BEFORE, Thresholds
from load_tests.server import LocalServer, StartupError, executable, log_tail, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
USER_CLASSES = ("WebAppListener", "ApiClient")  # the default mix
ALL_USER_CLASSES = (*USER_CLASSES, "SessionListener")
SHAPES = ("ramp", "spike", "soak")
MAX_USERS = 2000
MAX_RUN_TIME_S = 6 * 3600
LOCUST_OK_CODES = (0, 1)  # locust exits 1 when any request failed: that is data, not an error
EXIT_THRESHOLD, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 1, 2, 130

console = Console(stderr=True)


class RunError(RuntimeError):
    """The load test could not run (server did not start, locust crashed, ...)."""


# --- option parsing ---

_TIMESPAN_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def parse_run_time(value: str) -> int:
    """Seconds in ``90``, ``90s``, ``5m``, ``1h30m`` (locust's notation)."""
    match = _TIMESPAN_RE.match(value.strip())
    if not value.strip() or match is None:
        raise ValueError(f"run time {value!r} is not like 90s, 5m or 1h30m")
    hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not 1 <= total <= MAX_RUN_TIME_S:
        raise ValueError(f"run time must be between 1 s and {MAX_RUN_TIME_S} s, got {total} s")
    return total


def parse_env_assignments(values: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (for ``--server-env``) as a dict."""
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--server-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


# --- processes ---


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs when a CI job is cancelled."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def scrape_metrics(host: str, headers: Mapping[str, str]) -> str | None:
    try:
        response = httpx.get(f"{host.rstrip('/')}/metrics", headers=dict(headers), timeout=10.0)
    except httpx.HTTPError as error:
        console.print(f"[yellow]could not scrape {host}/metrics: {error}[/]")
        return None
    if response.status_code != 200:
        console.print(f"[yellow]{host}/metrics answered HTTP {response.status_code}[/]")
        return None
    return response.text


# --- the locust run ---


@dataclass(frozen=True)
class LocustPlan:
    host: str
    output: Path
    users: int
    spawn_rate: float
    run_time_s: int
    user_classes: tuple[str, ...]
    shape: str | None = None
    playback_speed: float = 1.0
    num_inference_steps: int | None = None
    processes: int = 1
    auth_token: str | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def csv_prefix(self) -> Path:
        return self.output / CSV_PREFIX

    def command(self) -> list[str]:
        command = [executable("locust"), "-f", str(LOCUSTFILE), "--headless"]
        command += ["--host", self.host, "-u", str(self.users), "-r", f"{self.spawn_rate:g}"]
        command += ["-t", f"{self.run_time_s}s", "--csv", str(self.csv_prefix)]
        command += ["--csv-full-history", "--html", str(self.output / "report.html")]
        command += ["--playback-speed", f"{self.playback_speed:g}", "--only-summary"]
        if self.num_inference_steps is not None:
            command += ["--num-inference-steps", str(self.num_inference_steps)]
        if self.processes > 1:
            command += ["--processes", str(self.processes)]
        return [*command, *self.extra_args, *self.user_classes]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("LOADTEST_SHAPE", None)
        if self.shape:
            env["LOADTEST_SHAPE"] = self.shape
        if self.auth_token:
            env["LOADTEST_AUTH_TOKEN"] = self.auth_token  # not on the command line: ps shows it
        return env


def run_locust(plan: LocustPlan) -> int:
    """Run locust to completion (bounded by the run time) and return its exit code."""
    log_path = plan.output / "locust.log"
    # Locust stops itself at the run time; the margin covers start-up and report writing.
    deadline = time.monotonic() + plan.run_time_s + 120
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            plan.command(),
            cwd=REPO_ROOT,
            env=plan.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with console.status("locust running") as status:
                while process.poll() is None:
                    if time.monotonic() > deadline:
                        raise RunError(f"locust did not stop by itself; log {log_path}")
                    status.update(f"locust running: {_progress(plan, log_path)}")
                    time.sleep(1.0)
        finally:
            # SIGINT makes locust stop users and still write its CSV and HTML reports.
            stop_process_group(process, first_signal=signal.SIGINT, grace_s=30.0)
    return int(process.returncode)


def _progress(plan: LocustPlan, log_path: Path) -> str:
    size = log_path.stat().st_size if log_path.exists() else 0
    return f"{plan.users} users max, {plan.run_time_s} s, log {log_path} ({size} bytes)"


def execute(plan: LocustPlan, thresholds: Thresholds, context: dict[str, str]) -> int:
    """Run locust against ``plan.host`` and write the outputs; returns the exit status."""
    headers = {"Authorization": f"Bearer {plan.auth_token}"} if plan.auth_token else {}
    metrics_before = scrape_metrics(plan.host, headers)
    started = datetime.now().astimezone()
    locust_code = run_locust(plan)
    metrics_after = scrape_metrics(plan.host, headers)
    if locust_code not in LOCUST_OK_CODES:
        raise RunError(
            f"locust exited with code {locust_code}; log {plan.output / 'locust.log'}:\n"
            f"{log_tail(plan.output / 'locust.log')}"
        )
    context = {"started": started.isoformat(timespec="seconds"), **context}
    for name, text in ((METRICS_BEFORE, metrics_before), (METRICS_AFTER, metrics_after)):
        if text is not None:
            (plan.output / name).write_text(text)
    violations = write_report(plan.output, CSV_PREFIX, thresholds, context)
    console.print(f"results in {plan.output}/ (summary.md, report.html, chart.png, CSV)")
    for violation in violations:
        console.print(f"[red]threshold exceeded:[/] {violation}")
    return EXIT_THRESHOLD if violations else 0


def _default_output() -> Path:
    return REPO_ROOT / f"loadtest-report-{datetime.now():%Y%m%d-%H%M%S}"


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option(
    "--host",
    help="Target base URL (e.g. https://my-deployment.bentoml.ai). "
    "Without it a local server is started with --model.",
)
@click.option("--model", default="tiny", help="RIFFUSION_MODEL of the local server.")
@click.option(
    "--server-env",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra environment for the local server, e.g. RIFFUSION_BATCHING=adaptive "
    "(or =off) to compare with the real-time engine. Repeatable.",
)
@click.option(
    "--server-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    help="Seconds to wait for the local server's /readyz.",
)
@click.option(
    "-u", "--users", type=click.IntRange(1, MAX_USERS), default=4, help="Peak concurrent users."
)
@click.option(
    "-r",
    "--spawn-rate",
    type=click.FloatRange(min=0.01),
    default=1.0,
    help="Users started per second.",
)
@click.option("-t", "--run-time", default="60s", help="Test length: 90s, 5m, 1h30m.")
@click.option(
    "--user-class",
    "user_classes",
    type=click.Choice(ALL_USER_CLASSES),
    multiple=True,
    help="User class to run (repeatable; default WebAppListener and ApiClient, 3:1).",
)
@click.option(
    "--shape",
    type=click.Choice(SHAPES),
    default=None,
    help="Load shape over the run time (default: a plain ramp-up at --spawn-rate).",
)
@click.option(
    "--playback-speed",
    type=click.FloatRange(min=0.01),
    default=1.0,
    help="Listeners play clips this many times faster than real time.",
)
@click.option(
    "--num-inference-steps",
    type=click.IntRange(1, 150),
    default=None,
    help="Diffusion steps per request (default: the web app's 50).",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    help="Locust worker processes on this machine (distributed mode).",
)
@click.option(
    "--auth-token",
    envvar="LOADTEST_AUTH_TOKEN",
    default=None,
    help="Bearer token for protected deployments (env LOADTEST_AUTH_TOKEN).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default ./loadtest-report-<timestamp>).",
)
@threshold_options
@click.option(
    "--locust-arg",
    "locust_args",
    multiple=True,
    help="Extra argument passed to locust verbatim (repeatable).",
)
def main(
    host: str | None,
    model: str,
    server_env: tuple[str, ...],
    server_timeout: float,
    users: int,
    spawn_rate: float,
    run_time: str,
    user_classes: tuple[str, ...],
    shape: str | None,
    playback_speed: float,
    num_inference_steps: int | None,
    processes: int,
    auth_token: str | None,
    output: Path | None,
    max_p95_ms: float | None,
    max_failure_rate: float | None,
    max_fell_behind_rate: float | None,
    locust_args: tuple[str, ...],
) -> None:
    """Run the Riffusion load test headless and write a report folder."""
    try:
        run_time_s = parse_run_time(run_time)
        extra_env = parse_env_assignments(server_env)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error
    if host is not None and extra_env:
        raise click.BadParameter("--server-env only applies to the local server (no --host)")
    output = (output or _default_output()).resolve()
    output.mkdir(parents=True, exist_ok=True)
    thresholds = Thresholds(max_p95_ms, max_failure_rate, max_fell_behind_rate)
    context = {
        "target": host or f"local server, RIFFUSION_MODEL={model}",
        "server env": " ".join(f"{k}={v}" for k, v in extra_env.items()) or "(default)",
        "users": f"{users} peak, spawn rate {spawn_rate:g}/s, shape {shape or 'plain'}",
        "user classes": ", ".join(user_classes or USER_CLASSES),
        "run time": f"{run_time_s} s",
        "playback speed": f"{playback_speed:g}x",
        "inference steps": str(num_inference_steps or "50 (web app default)"),
    }
    server: LocalServer | None = None
    try:
        with interrupt_on_sigterm():
            if host is None:
                console.print(f"starting a local server (RIFFUSION_MODEL={model}) ...")
                server = LocalServer(
                    output / "server.log", model, env=extra_env, ready_timeout_s=server_timeout
                )
                server.start()
            plan = LocustPlan(
                host=host or (server.url if server else ""),
                output=output,
                users=users,
                spawn_rate=spawn_rate,
                run_time_s=run_time_s,
                user_classes=user_classes,
                shape=shape,
                playback_speed=playback_speed,
                num_inference_steps=num_inference_steps,
                processes=processes,
                auth_token=auth_token,
                extra_args=locust_args,
            )
            code = execute(plan, thresholds, context)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopped everything this run started[/]")
        code = EXIT_INTERRUPTED
    except (RunError, StartupError) as error:
        console.print(f"[red]load test failed:[/] {error}")
        code = EXIT_RUN_FAILED
    finally:
        if server is not None:
            server.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
