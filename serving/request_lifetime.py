"""A request's lifetime on the API service: its deadline, and cancelling it if the client leaves.

BentoML keeps running a handler whose client has disconnected. ``RequestLifetime``
watches the connection once the body has been read and cancels the handler when the
client goes away, so ``ModelClient`` cancels the request's clips in the model service.
It also sets the request's deadline: the service's request timeout, or a tighter one
from the ``X-Riffusion-Timeout-Seconds`` header.

A cancelled handler's request still ends with an answer nobody reads (status 499,
"client closed request", or the end of a response already begun): BentoML's
timeout middleware, outside this one, waits for a response's first message and held
an abandoned request (and its ``request_in_progress`` gauge) until the request
timeout without it.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

TIMEOUT_HEADER = b"x-riffusion-timeout-seconds"
# The answer to a request whose client left first (nginx's code; counted in the metrics).
CLIENT_CLOSED_STATUS = 499
_CLIENT_CLOSED_BODY = b'{"error": "the client closed the request", "detail": []}'
# time.monotonic() by which the current HTTP request must be answered.
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "riffusion_request_deadline", default=None
)


def request_timeout(header: bytes | None, default_s: float) -> float:
    """The caller's timeout when it is a positive number below ``default_s``, else the default."""
    try:
        asked = float(header.decode("latin-1")) if header else math.inf
    except ValueError:
        asked = math.inf
    return asked if 0 < asked < default_s else default_s


class ResponseProgress:
    """What an application has sent of its response, seen through ``send``."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.begun = False  # its status and headers are out
        self.ended = False  # its last body message is out

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.begun = True
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.ended = True
        await self._send(message)


class RequestLifetime:
    """ASGI middleware: per-request deadline, and handler cancellation on client disconnect."""

    def __init__(self, app: ASGIApp, default_timeout_s: float) -> None:
        self.app = app
        self.default_timeout_s = default_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        timeout = request_timeout(
            dict(scope["headers"]).get(TIMEOUT_HEADER), self.default_timeout_s
        )
        REQUEST_DEADLINE.set(time.monotonic() + timeout)
        body_read = asyncio.Event()
        disconnected = asyncio.Event()

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            elif message["type"] == "http.disconnect":
                disconnected.set()
            return message

        async def watch_client(handler: asyncio.Task[None]) -> None:
            await body_read.wait()
            # After the body, the server's receive() only ever answers "http.disconnect".
            while not disconnected.is_set():
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
            handler.cancel()

        response = ResponseProgress(send)
        handler = asyncio.ensure_future(self.app(scope, tracked_receive, response.send))
        watcher = asyncio.ensure_future(watch_client(handler))
        try:
            await handler
        except asyncio.CancelledError:
            if not disconnected.is_set():
                raise  # cancelled by the server itself, not by the client leaving
            if not response.ended:
                await _end_abandoned(send, begun=response.begun)
        finally:
            watcher.cancel()


async def _end_abandoned(send: Send, begun: bool) -> None:
    """End the response of a request whose client left (the server drops what is sent)."""
    if begun:
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_CLIENT_CLOSED_BODY)).encode()),
    ]
    await send({"type": "http.response.start", "status": CLIENT_CLOSED_STATUS, "headers": headers})
    await send({"type": "http.response.body", "body": _CLIENT_CLOSED_BODY})
