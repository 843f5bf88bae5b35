"""Shutdown within one budget: SIGTERM starts a grace period, its end answers what is left.

On SIGTERM, uvicorn (under each BentoML worker) stops accepting connections and
waits for the requests in flight, with no limit of its own. ``ShutdownDrain``
bounds that wait to ``RIFFUSION_SHUTDOWN_GRACE_S``:

1. SIGTERM (either worker; BentoML's supervisor forwards it to every process):
   the drain notes the time and hands the signal on to uvicorn.
2. Requests in flight keep running. A clip whose client leaves, before or during
   the grace, is dropped at once: ``RequestLifetime``, on both services, cancels
   the handler when its caller's connection closes (the API's client, or the API
   itself for the model service) and answers it 499. The API's explicit cancel
   call finds the model service's socket closed during a shutdown; the closed
   connection alone drops the clip there.
3. When the grace ends, ``DrainOnShutdown`` cancels every request still running
   and answers it ``503`` with ``Retry-After`` (the client retries on another pod);
   the model service's cancelled clips leave the engine at its next step.
4. uvicorn then finds nothing in flight and the worker exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from serving.errors import error_response
from serving.request_lifetime import ResponseProgress

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

# Under BentoML's logger: its handler prints INFO lines in the server log (the root
# logger, and so "riffusion.*", stays at WARNING under `bentoml serve`).
logger = logging.getLogger("bentoml.riffusion")
RETRY_AFTER_S = 1  # another pod can take the request at once
FORCE_EXIT_AFTER_S = 2.0  # after the grace: time for the 503 answers to go out


class ShutdownDrain:
    """This process's shutdown: the grace period's deadline and the requests it may cut short."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # time.monotonic() at which the grace ends
        self.expired = False
        self._running: set[asyncio.Task[Any]] = set()
        self._installed = False

    def install(self) -> None:
        """Chain a SIGTERM handler before uvicorn's; call once the server loop runs."""
        if self._installed:
            return
        self._installed = True
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            if self.deadline is None:
                self.deadline = time.monotonic() + self.grace_s
                loop.call_soon_threadsafe(loop.call_later, self.grace_s, self._expire)
                logger.info(
                    "SIGTERM: finishing %d request(s) in flight within %.0f s",
                    len(self._running),
                    self.grace_s,
                )
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread (in-process use): uvicorn's handler stays
            logger.warning("shutdown grace not installed: not on the main thread")

    def remaining_s(self) -> float:
        """Seconds left in the grace period (the whole of it before SIGTERM)."""
        if self.deadline is None:
            return self.grace_s
        return max(0.0, self.deadline - time.monotonic())

    def _expire(self) -> None:
        self.expired = True
        if self._running:
            logger.warning(
                "shutdown grace of %.0f s is over: answering %d request(s) 503",
                self.grace_s,
                len(self._running),
            )
        for task in list(self._running):
            task.cancel()
        # Then stop waiting on anything else: uvicorn's second-signal path (SIGINT while
        # already exiting) makes it skip its wait for connections and background tasks.
        asyncio.get_running_loop().call_later(FORCE_EXIT_AFTER_S, self._force_exit)

    def _force_exit(self) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            logger.warning(
                "still running %.0f s after the grace: forcing the exit", FORCE_EXIT_AFTER_S
            )
            handler(signal.SIGINT, None)

    def track(self, task: asyncio.Task[Any]) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)


class DrainOnShutdown:
    """ASGI middleware: requests still running when the grace ends are answered 503."""

    def __init__(self, app: ASGIApp, drain: ShutdownDrain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        response = ResponseProgress(send)
        handler = asyncio.ensure_future(self.app(scope, receive, response.send))
        self.drain.track(handler)
        try:
            await handler
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self.drain.expired or (current is not None and current.cancelling()):
                raise  # cancelled for another reason (client gone): not ours to answer
            if not response.begun:
                response = error_response(
                    503,
                    None,
                    "the server is shutting down; retry the request",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
                await response(scope, receive, send)
