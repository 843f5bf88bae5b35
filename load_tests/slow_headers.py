"""Slow-headers attack on a local served instance, bounded in time (127.0.0.1 only).

Opens up to ``--connections`` connections to the API at ``--rate`` per second, each
sending a request line and then one header line every ``--trickle`` seconds, never
ending its headers (a "slowloris"). Meanwhile a well-behaved client asks for
``/readyz`` and ``/seed_images`` once a second. After ``--duration`` seconds
everything is closed and a summary is printed:

- how many attack connections the server accepted, and how many it closed;
- the most attack connections held open at once, and the API worker's most open file
  descriptors (from /proc; the attacker's own are not counted);
- the well-behaved client's answers (status counts) and their slowest time.

Starts its own server (tiny model) unless ``--url`` is given; the header timeout and
connection cap are the server's defaults unless ``--header-timeout``/``--max-connections``
set them (``RIFFUSION_HEADER_TIMEOUT_S``, ``RIFFUSION_MAX_CONNECTIONS``).

    uv run --frozen --all-extras python -m load_tests.slow_headers --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from load_tests.server import LocalServer

API_KEY = "slow-headers-key"


@dataclass
class Tally:
    opened: int = 0
    refused: int = 0  # could not connect at all
    closed_by_server: int = 0
    open_now: int = 0
    most_open: int = 0
    most_fds: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    slowest_answer_s: float = 0.0


async def slow_client(port: int, trickle_s: float, stop: asyncio.Event, tally: Tally) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        tally.refused += 1
        return
    tally.opened += 1
    tally.open_now += 1
    tally.most_open = max(tally.most_open, tally.open_now)
    try:
        writer.write(b"GET /seed_images HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        line = 0
        while not stop.is_set():
            # The server closing the connection ends the read with b"" at once.
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), timeout=trickle_s) == b"":
                    tally.closed_by_server += 1
                    return
            writer.write(f"X-Slow-{line}: {'a' * 8}\r\n".encode())
            await writer.drain()
            line += 1
    except (ConnectionError, OSError):
        tally.closed_by_server += 1
    finally:
        tally.open_now -= 1
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def good_client(url: str, stop: asyncio.Event, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        while not stop.is_set():
            for path in ("/readyz", "/seed_images"):
                began = time.perf_counter()
                try:
                    status = str((await client.get(path)).status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                tally.answers[f"{path} {status}"] += 1
                tally.slowest_answer_s = max(tally.slowest_answer_s, time.perf_counter() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def api_worker(server_pid: int) -> psutil.Process | None:
    for child in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()
            if "--service-name" in command and command[command.index("--service-name") + 1] == (
                "riffusion"
            ):
                return child
    return None


async def watch_fds(worker: psutil.Process | None, stop: asyncio.Event, tally: Tally) -> None:
    while worker is not None and not stop.is_set():
        with contextlib.suppress(psutil.Error):
            tally.most_fds = max(tally.most_fds, worker.num_fds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def attack(
    url: str, args: argparse.Namespace, worker: psutil.Process | None
) -> tuple[Tally, int]:
    port = int(url.rsplit(":", 1)[1])
    tally, stop = Tally(), asyncio.Event()
    fds_before = worker.num_fds() if worker is not None else 0
    tasks = [
        asyncio.create_task(good_client(url, stop, tally)),
        asyncio.create_task(watch_fds(worker, stop, tally)),
    ]
    began = time.monotonic()
    for index in range(args.connections):
        if time.monotonic() - began > args.duration:
            break
        tasks.append(asyncio.create_task(slow_client(port, args.trickle, stop, tally)))
        await asyncio.sleep(max(0.0, began + (index + 1) / args.rate - time.monotonic()))
    await asyncio.sleep(max(0.0, began + args.duration - time.monotonic()))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally, fds_before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server (key: slow-headers-key)")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0, help="new connections per second")
    parser.add_argument("--trickle", type=float, default=5.0, help="seconds between header lines")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--header-timeout", type=float, default=None)
    parser.add_argument("--max-connections", type=int, default=None)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the attacker needs the sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    env: dict[str, str | None] = {"RIFFUSION_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"}
    if args.header_timeout is not None:
        env["RIFFUSION_HEADER_TIMEOUT_S"] = str(args.header_timeout)
    if args.max_connections is not None:
        env["RIFFUSION_MAX_CONNECTIONS"] = str(args.max_connections)
    with contextlib.ExitStack() as stack:
        worker = None
        url = args.url
        if url is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server = LocalServer(home / "serve.log", "tiny", {**env, "BENTOML_HOME": str(home)})
            stack.enter_context(server)
            url = server.url
            assert server.process is not None
            worker = api_worker(server.process.pid)
        tally, fds_before = asyncio.run(attack(url, args, worker))
    print(
        f"attack: {tally.opened} connections opened ({tally.refused} refused at connect) "
        f"in {args.duration:.0f} s, one header line every {args.trickle:g} s"
    )
    print(
        f"closed by the server: {tally.closed_by_server}; most held open at once: {tally.most_open}"
    )
    if worker is not None:
        print(f"API worker open file descriptors: {fds_before} before, at most {tally.most_fds}")
    print(
        f"well-behaved client: {dict(sorted(tally.answers.items()))}, "
        f"slowest {tally.slowest_answer_s:.2f} s"
    )
    ok = all(key.endswith(" 200") for key in tally.answers) and tally.answers
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
