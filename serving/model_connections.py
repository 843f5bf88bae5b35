"""The API's connections to the model service: rotated without dropping calls in flight.

BentoML's client to a dependency (``bentoml.depends``) renews its HTTP session every
``runner_connection.max_requests`` calls (default 100) or ``max_age`` seconds (300), so
that new connections reach new replicas. It closes the old session at once, and
closing an aiohttp session closes every connection it holds, including those of calls
still in flight: each such call fails with ``ServerDisconnectedError``, the model
service sees its caller leave and drops the clip (a 499), and the API retries it from
its first step. Measured on the emulated H100 with 11 listeners: every ~40 s all 8-10
clips in flight were lost and started over (docs/benchmarks.md, "Model connections").

``rotate_sessions_gracefully`` keeps the renewal and its purpose, but retires the old
session instead of closing it: new calls take the new session at once, and the old one
is closed once no call can still be running on it (``grace_s``: the request timeout),
or when the client itself is closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

_GRACE = "_riffusion_retire_grace_s"  # on the class, once patched: the grace in seconds
_RETIRED = "_riffusion_retired_sessions"  # on each client: session -> its closing timer


def rotate_sessions_gracefully(grace_s: float) -> None:
    """Make BentoML's dependency clients retire renewed sessions for ``grace_s``."""
    from _bentoml_impl.client.proxy2 import SessionManager

    patched = hasattr(SessionManager, _GRACE)
    setattr(SessionManager, _GRACE, grace_s)
    if patched:
        return

    async def get_session(self: Any) -> Any:
        if self._session is None or self._should_refresh():
            if self._session is not None:
                _retire(self, self._session, getattr(self, _GRACE))
            self._session = self._make_client()
            self._created_at = time.monotonic()
            self._request_count = 0
        self._request_count += 1
        return self._session

    original_close = SessionManager.close

    async def close(self: Any) -> None:
        for session, timer in list(_retired(self).items()):
            timer.cancel()
            await session.close()
        _retired(self).clear()
        await original_close(self)

    SessionManager.get_session = get_session
    SessionManager.close = close


def _retired(manager: Any) -> dict[Any, asyncio.TimerHandle]:
    """The manager's sessions waiting to be closed, each with its timer."""
    retired: dict[Any, asyncio.TimerHandle] | None = getattr(manager, _RETIRED, None)
    if retired is None:
        retired = {}
        setattr(manager, _RETIRED, retired)
    return retired


def _retire(manager: Any, session: Any, grace_s: float) -> None:
    loop = asyncio.get_running_loop()
    retired = _retired(manager)

    def close() -> None:
        if retired.pop(session, None) is not None:
            task = loop.create_task(session.close())
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

    retired[session] = loop.call_later(grace_s, close)


_CLOSING: set[asyncio.Task[None]] = set()  # closes in progress (kept from the collector)
