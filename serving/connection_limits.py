"""Bounds on the connections the API worker holds: a header-read timeout and a connection cap.

BentoML 1.4 runs its workers on uvicorn and exposes only ``timeout_keep_alive`` (idle
time *after* a response) and the listen backlog; uvicorn (0.54) itself has neither a
header timeout nor a connection limit (its ``limit_concurrency``, not exposed by
BentoML, answers 503 only once a request's headers are complete). So a connection
that never finishes its headers is held for ever: 10,000 of them took 10,018 file
descriptors. ``bound_connections`` adds both bounds to uvicorn's HTTP protocols
(httptools and h11) in this process, before the server starts:

1. header timeout: a connection waiting for a request's headers (a new one, or a
   kept-alive one that started another request) longer than ``header_timeout_s`` is
   closed;
2. connection cap: past ``max_connections`` open connections, a new one evicts the
   connection that has waited longest for its headers; when none is waiting (all are
   serving requests), the new one is closed at once.

A connection upgraded to a WebSocket (a listener session) is done with headers: no
timer runs on it.

Measured with ``load_tests/slow_headers.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger("riffusion.http")

_STATE = "_riffusion_header_wait"  # per connection: (waiting since, timer) or None


def _upgraded(connection: Any) -> bool:
    """The connection became a WebSocket (its transport now speaks another protocol)."""
    transport = getattr(connection, "transport", None)
    return transport is not None and transport.get_protocol() is not connection


def _waiting_for_headers(connection: Any) -> bool:
    """No request of this connection is between its headers and its response's end (a
    connection upgraded to a WebSocket has sent its headers for good)."""
    if _upgraded(connection):
        return False
    cycle = getattr(connection, "cycle", None)
    return cycle is None or bool(cycle.response_complete)


def _stop_waiting(connection: Any) -> None:
    state = getattr(connection, _STATE, None)
    if state is not None:
        state[1].cancel()
        setattr(connection, _STATE, None)


def _start_waiting(connection: Any, header_timeout_s: float) -> None:
    if getattr(connection, _STATE, None) is not None:
        return
    loop = asyncio.get_running_loop()
    timer = loop.call_later(header_timeout_s, _header_timeout, connection)
    setattr(connection, _STATE, (time.monotonic(), timer))


def _header_timeout(connection: Any) -> None:
    setattr(connection, _STATE, None)
    if _waiting_for_headers(connection) and not connection.transport.is_closing():
        logger.debug("closing a connection that sent no complete headers in time")
        connection.transport.close()


def _evict_for(new: Any, max_connections: int) -> None:
    """Make room for ``new`` past the cap: the longest-waiting connection goes, or ``new``."""
    if len(new.connections) <= max_connections:
        return
    waiting = [
        (state[0], connection)
        for connection in new.connections
        if connection is not new and (state := getattr(connection, _STATE, None)) is not None
    ]
    victim = min(waiting, key=lambda item: item[0])[1] if waiting else new
    _stop_waiting(victim)
    victim.transport.close()


def _bound(protocol: type, header_timeout_s: float, max_connections: int) -> None:
    connection_made = protocol.connection_made  # type: ignore[attr-defined]
    data_received = protocol.data_received  # type: ignore[attr-defined]
    connection_lost = protocol.connection_lost  # type: ignore[attr-defined]

    def bounded_connection_made(self: Any, transport: Any) -> None:
        connection_made(self, transport)
        _start_waiting(self, header_timeout_s)
        _evict_for(self, max_connections)

    def bounded_data_received(self: Any, data: bytes) -> None:
        data_received(self, data)
        if _waiting_for_headers(self):
            _start_waiting(self, header_timeout_s)  # its next request's clock starts
        else:
            _stop_waiting(self)

    def bounded_connection_lost(self: Any, exc: Exception | None) -> None:
        _stop_waiting(self)
        connection_lost(self, exc)

    protocol.connection_made = bounded_connection_made  # type: ignore[attr-defined]
    protocol.data_received = bounded_data_received  # type: ignore[attr-defined]
    protocol.connection_lost = bounded_connection_lost  # type: ignore[attr-defined]
    protocol._riffusion_bounded = (header_timeout_s, max_connections)  # type: ignore[attr-defined]


def bound_connections(header_timeout_s: float, max_connections: int) -> None:
    """Add the header timeout and the connection cap to uvicorn's HTTP protocols (once)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    protocols: list[type] = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed: uvicorn uses h11
        pass
    else:
        protocols.append(HttpToolsProtocol)
    for protocol in protocols:
        if getattr(protocol, "_riffusion_bounded", None) is None:
            _bound(protocol, header_timeout_s, max_connections)
