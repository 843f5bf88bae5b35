"""The API's client renews its connections to the model service without dropping calls.

BentoML's dependency client renews its HTTP session every ``max_requests`` calls; it
used to close the old one at once, failing every call still in flight on it (each
clip then lost and started over). Against a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio

from _bentoml_impl.client.proxy2 import SessionManager
from aiohttp import web

from serving.model_connections import rotate_sessions_gracefully

CALL_S = 0.5  # how long the server takes to answer: the call is in flight meanwhile


async def _serve() -> tuple[web.AppRunner, str]:
    async def slow(_request: web.Request) -> web.Response:
        await asyncio.sleep(CALL_S)
        return web.Response(text="clip")

    app = web.Application()
    app.router.add_get("/submit", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_a_call_in_flight_survives_the_renewal_of_its_session() -> None:
    rotate_sessions_gracefully(grace_s=CALL_S * 2)

    async def scenario() -> None:
        runner, url = await _serve()
        manager = SessionManager(url, timeout=30, headers={}, max_requests=1)
        try:
            first = await manager.get_session()
            in_flight = asyncio.create_task(first.get("/submit"))
            await asyncio.sleep(CALL_S / 5)  # sent, not answered
            second = await manager.get_session()
            second = await manager.get_session()  # past max_requests: renewed
            assert second is not first
            response = await in_flight  # raised ServerDisconnectedError before
            assert response.status == 200 and await response.text() == "clip"
            assert not first.closed  # retired, closed after the grace
            again = await second.get("/submit")  # the new session works
            assert await again.text() == "clip"
            deadline = asyncio.get_running_loop().time() + 30
            while not first.closed:
                assert asyncio.get_running_loop().time() < deadline, "never closed"
                await asyncio.sleep(0.05)
        finally:
            await manager.close()
            await runner.cleanup()
        assert second.closed

    asyncio.run(scenario())


def test_closing_the_client_closes_its_retired_sessions_too() -> None:
    rotate_sessions_gracefully(grace_s=3600.0)

    async def scenario() -> None:
        runner, url = await _serve()
        manager = SessionManager(url, timeout=30, headers={}, max_requests=1)
        try:
            first = await manager.get_session()
            await manager.get_session()
            await manager.get_session()  # renewed: the first is retired for an hour
            assert not first.closed
            await manager.close()
            assert first.closed
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
