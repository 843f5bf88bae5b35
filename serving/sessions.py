"""Listener sessions: one WebSocket per listener, clips scheduled against their playback.

A listener opens ``/session`` and sends the jam's settings; the server admits them
(or refuses at once: the service is full, retry later), then streams clips back to
back, each one submitted to the model service due when that listener's buffer would
run dry. ``SessionHub.serve`` runs one session:

1. ``start``: the first message (within ``start_timeout_s``) carries the API key when
   one is set (browsers cannot send headers on a WebSocket) and ``JamSettings``; a bad
   one is answered with an error naming the field and the socket is closed (1008);
2. admission: the model service admits the listener only if everyone admitted stays
   in real time (``riffusion.listeners``); refused: ``refused`` with a retry hint, 1013;
3. the clip loop: while less than ``lookahead_s`` of audio is buffered ahead, the next
   job of the walk (``riffusion.jam``) goes to the model service, due at the
   buffer's dry time less ``margin_s`` (``riffusion.playback``); the clip is encoded
   as the web app's JPEG and MP3 data URLs and sent with its alpha, prompts and timings;
4. meanwhile the listener's messages: ``steer`` (what to hear next, from the next clip
   on) and ``played`` (how far playback got, so the buffer estimate stays true);
5. the end: a listener who leaves has its clip in flight cancelled (the model service
   drops it within a step) and its place freed; on shutdown (``drain``) each session
   finishes the clip in flight, is told to ``reconnect`` elsewhere and closed (1012).

Messages are JSON text frames; docs/sessions.md is the protocol's reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from riffusion.api_schemas import ListenerDecision, ModelResult
from riffusion.jam import JamSettings, JamSteer, JamWalk
from riffusion.playback import PlaybackClock
from riffusion.schemas import GenerationJob
from serving.answers import web_app_payload
from serving.errors import ApiError
from serving.metrics import (
    BUFFER_AHEAD,
    SESSIONS_ACTIVE,
    SESSIONS_REFUSED,
    UNDERRUN_SECONDS,
    UNDERRUNS,
)
from serving.model_calls import ModelCallError, ModelClient

logger = logging.getLogger("riffusion.sessions")

# Close codes (RFC 6455 and IANA's registry).
POLICY_VIOLATION = 1008  # bad start message or API key
MESSAGE_TOO_BIG = 1009
SERVICE_RESTART = 1012  # shutting down: reconnect (elsewhere)
TRY_AGAIN_LATER = 1013  # full
MAX_MESSAGE_CHARS = 16 * 1024


class ListenerGate(Protocol):
    """The model service as a session sees it."""

    def check(self, job: GenerationJob) -> None:
        """Raise ``ApiError`` (400, naming the field) for a job the service cannot take."""

    async def open(self, listener_id: str, job: GenerationJob) -> ListenerDecision: ...

    async def close(self, listener_id: str) -> None: ...

    async def clip(self, job: GenerationJob, listener_id: str, due_s: float) -> Any:
        """The clip (a ``ModelResult``), due in ``due_s``; raises ``ApiError``."""


class ModelListenerGate:
    """``ListenerGate`` over the model service; ``check_image_ids`` is the API's own check."""

    def __init__(
        self, client: ModelClient, check_image_ids: Callable[[str | None, str | None], None]
    ) -> None:
        self.client = client
        self.check_image_ids = check_image_ids

    def check(self, job: GenerationJob) -> None:
        self.check_image_ids(job.seed_image_id, job.mask_image_id)

    async def open(self, listener_id: str, job: GenerationJob) -> ListenerDecision:
        try:
            return await self.client.open_listener(listener_id, job)
        except Exception as error:  # not started, restarting: the listener may retry
            logger.warning("could not ask the model service for a listener's place: %r", error)
            return ListenerDecision(
                accepted=False,
                message="the model service is not answering; retry shortly",
                retry_after_s=5.0,
            )

    async def close(self, listener_id: str) -> None:
        await self.client.close_listener(listener_id)

    async def clip(self, job: GenerationJob, listener_id: str, due_s: float) -> ModelResult:
        try:
            [result] = await self.client.generate([job], due_s=due_s, listener_id=listener_id)
        except ModelCallError as failure:
            raise failure.api_error() from None
        return result


async def encode_clip(result: ModelResult) -> dict[str, Any]:
    """A clip as the web app's endpoint answers it (JPEG and MP3 data URLs), exact duration."""
    payload = await asyncio.to_thread(web_app_payload, result)
    return {**payload.model_dump(), "duration_s": result.audio().duration_s}


@dataclass(frozen=True)
class SessionConfig:
    lookahead_s: float = 10.24  # two default clips buffered ahead, at most
    margin_s: float = 1.0  # encoding and the network, before the buffer runs dry
    start_timeout_s: float = 10.0
    retry_delay_s: float = 1.0  # after a clip the service could not make (503)
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ("*",)


class SessionStart(JamSettings):
    """The first message: ``{"type": "start", "api_key": ..., <JamSettings>}``."""

    type: str = "start"
    api_key: str | None = None

    def settings(self) -> JamSettings:
        """The jam's settings, validated with this message (not again)."""
        return JamSettings.model_construct(**self.model_dump(include=set(JamSettings.model_fields)))


class Played(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = "played"
    position_s: float = Field(ge=0, description="Seconds of the session's audio played.")


def _field_of(error: ValidationError) -> str:
    loc = error.errors()[0]["loc"] if error.errors() else ()
    return ".".join(str(part) for part in loc) or "message"


class SessionHub:
    """Every session of this API worker; ``serve`` is the WebSocket endpoint."""

    def __init__(
        self,
        gate: ListenerGate,
        encode: Callable[[Any], Awaitable[dict[str, Any]]],
        config: SessionConfig | None = None,
    ) -> None:
        self.gate = gate
        self.encode = encode  # ModelResult -> {"image", "audio", "duration_s"}
        self.config = config or SessionConfig()
        self.draining = asyncio.Event()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._shutdown: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self._sessions)

    async def serve(self, websocket: WebSocket) -> None:
        if not self._origin_allowed(websocket):
            await websocket.close(POLICY_VIOLATION, "origin not allowed")
            return
        await websocket.accept()
        if self.draining.is_set():
            await self.reconnect(websocket)
            return
        try:
            start = await self._start(websocket)
        except WebSocketDisconnect:
            return
        if start is None:
            return
        session = Session(self, websocket, start)
        await session.run()

    def _origin_allowed(self, websocket: WebSocket) -> bool:
        origins = self.config.allowed_origins
        origin = websocket.headers.get("origin")
        return "*" in origins or origin is None or origin in origins

    async def _start(self, websocket: WebSocket) -> SessionStart | None:
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), self.config.start_timeout_s)
        except TimeoutError:
            await _refuse(websocket, POLICY_VIOLATION, "type", "no start message in time")
            return None
        try:
            message = _parse(raw)
            if message.get("type") != "start":
                raise _BadMessage("type", "the first message must be of type 'start'")
            start = SessionStart.model_validate(message)
        except _BadMessage as bad:
            await _refuse(websocket, bad.code, bad.field, bad.message)
            return None
        except ValidationError as error:
            field = _field_of(error)
            await _refuse(websocket, POLICY_VIOLATION, field, error.errors()[0]["msg"])
            return None
        if self.config.api_key is not None and not hmac.compare_digest(
            (start.api_key or "").encode(), self.config.api_key.encode()
        ):
            await _refuse(websocket, POLICY_VIOLATION, "api_key", "missing or wrong API key")
            return None
        return start

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """The current task is an admitted session until the block ends."""
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        SESSIONS_ACTIVE.inc()
        try:
            yield
        finally:
            SESSIONS_ACTIVE.dec()
            self._sessions.discard(task)

    async def reconnect(self, websocket: WebSocket) -> None:
        """Tell a listener this server is going away, and close its socket (1012)."""
        with contextlib.suppress(Exception):
            await websocket.send_json(
                {
                    "type": "reconnect",
                    "message": "this server is shutting down; reconnect (to another replica)",
                    "retry_after_s": 1,
                }
            )
            await websocket.close(SERVICE_RESTART, "server shutting down")

    def drain(self) -> None:
        """Shutting down: every session ends after its clip in flight, told to reconnect."""
        self.draining.set()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Whether every session ended within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._sessions

    def drain_on_sigterm(self, grace_s: float) -> bool:
        """Run ``drain`` on SIGTERM before the server's own shutdown (which closes sockets).

        Chained before the handler in place (uvicorn's, in a served worker): that one runs
        once every session has ended, or after ``grace_s``. Answers whether it was
        installed (not without a handler to chain, nor off the main thread).
        """
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous) or threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()

        def handle(signum: int, frame: Any) -> None:
            if not self._sessions or self.draining.is_set():
                previous(signum, frame)  # nothing to drain, or a second SIGTERM
                return
            logger.info("SIGTERM: %d session(s) end after their clip in flight", self.active)
            self.drain()

            async def then_shut_down() -> None:
                await self.wait_drained(grace_s)
                previous(signum, frame)

            self._shutdown = loop.create_task(then_shut_down())

        signal.signal(signal.SIGTERM, handle)
        return True


class _BadMessage(Exception):
    def __init__(self, field: str, message: str, code: int = POLICY_VIOLATION) -> None:
        super().__init__(message)
        self.field, self.message, self.code = field, message, code


def _parse(raw: str) -> dict[str, Any]:
    if len(raw) > MAX_MESSAGE_CHARS:
        raise _BadMessage("message", f"over {MAX_MESSAGE_CHARS} characters", MESSAGE_TOO_BIG)
    try:
        message = json.loads(raw)
    except ValueError as error:
        raise _BadMessage("message", f"not JSON: {error}") from error
    if not isinstance(message, dict):
        raise _BadMessage("message", "must be a JSON object")
    return message


async def _refuse(websocket: WebSocket, code: int, field: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_json({"type": "error", "field": field, "message": message})
        await websocket.close(code, message[:120])


class Session:
    """One admitted listener: the clip loop and the listener's messages."""

    def __init__(self, hub: SessionHub, websocket: WebSocket, start: SessionStart) -> None:
        self.hub = hub
        self.websocket = websocket
        self.id = uuid.uuid4().hex
        self.walk = JamWalk(start.settings())
        self.clock = PlaybackClock()
        self.wake = asyncio.Event()
        self.steers: list[tuple[float, int]] = []  # (received at, first clip it applies to)
        self._before_steer: tuple[int, JamWalk] | None = None  # (first clip, walk before)

    async def run(self) -> None:
        config = self.hub.config
        first_job = self.walk.next_job()
        try:
            self.hub.gate.check(first_job)
        except ApiError as error:
            await _refuse(self.websocket, POLICY_VIOLATION, error.field or "start", error.message)
            return
        decision = await self.hub.gate.open(self.id, first_job)
        if not decision.accepted:
            SESSIONS_REFUSED.inc()
            with contextlib.suppress(Exception):
                await self.websocket.send_json(
                    {
                        "type": "refused",
                        "message": decision.message,
                        "retry_after_s": decision.retry_after_s,
                    }
                )
                await self.websocket.close(TRY_AGAIN_LATER, "the service is full")
            return
        with self.hub.admitted():
            reader = asyncio.create_task(self._read())
            try:
                await self.websocket.send_json(
                    {
                        "type": "accepted",
                        "session_id": self.id,
                        "lookahead_s": config.lookahead_s,
                        "message": decision.message,
                    }
                )
                await self._clips(first_job, reader)
            except WebSocketDisconnect:
                pass
            finally:
                reader.cancel()
                with contextlib.suppress(Exception):  # its place first, then the gauge
                    await self.hub.gate.close(self.id)

    async def _clips(self, first_job: GenerationJob, reader: asyncio.Task[None]) -> None:
        """Steps 3 and 5: clips while the listener is here and the server is not draining."""
        config = self.hub.config
        index = 0
        job: GenerationJob | None = first_job
        while not reader.done():  # done: the listener left, or said stop
            if self.hub.draining.is_set():
                await self.hub.reconnect(self.websocket)
                return
            now = time.monotonic()
            ahead = self.clock.ahead_s(now)
            if index > 0 and ahead >= config.lookahead_s:
                await self._sleep(ahead - config.lookahead_s, reader)
                continue
            if job is None:
                job = self.walk.next_job()
            outcome = await self._one_clip(index, job, max(0.0, ahead - config.margin_s), reader)
            if outcome == "gone":
                return
            if outcome == "sent":
                index += 1
            if outcome != "retry":
                job = None  # the next one of the walk (after "redo": the walk before the steer)

    async def _one_clip(
        self, index: int, job: GenerationJob, due_s: float, reader: asyncio.Task[None]
    ) -> str:
        """Make, encode and send clip ``index``: sent, retry (same job), redo or gone."""
        asked = time.monotonic()
        ahead_s = self.clock.ahead_s(asked)
        making = asyncio.create_task(self._make(job, due_s))
        await asyncio.wait({making, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not making.done():  # the listener left: drop the clip (cancelled in the model)
            making.cancel()
            with contextlib.suppress(BaseException):
                await making
            return "gone"
        try:
            clip = making.result()
        except ApiError as failure:
            return await self._report_failure(index, failure, reader)
        now = time.monotonic()
        BUFFER_AHEAD.observe(self.clock.ahead_s(now))
        underrun = self.clock.deliver(clip["duration_s"], now)
        if underrun is not None:
            UNDERRUNS.inc()
            UNDERRUN_SECONDS.observe(underrun.seconds)
        applied = [at for at, first in self.steers if first <= index]
        self.steers = [(at, first) for at, first in self.steers if first > index]
        if self._before_steer is not None and self._before_steer[0] <= index:
            self._before_steer = None  # the steer made a clip: no way back needed
        await self.websocket.send_json(
            {
                "type": "clip",
                "index": index,
                "alpha": job.alpha,
                "start": _prompt_of(job.start),
                "end": _prompt_of(job.end_or_start),
                "seed_image_id": job.seed_image_id,
                "mask_image_id": job.mask_image_id,
                **clip,
                "buffer_ahead_s": round(ahead_s, 3),
                "due_in_s": round(due_s, 3),
                "underrun_s": round(underrun.seconds, 3) if underrun else 0.0,
                "timings": {
                    **clip.get("timings", {}),
                    "asked_to_sent_s": round(now - asked, 4),
                    **({"steer_to_sent_s": round(now - min(applied), 4)} if applied else {}),
                },
            }
        )
        return "sent"

    async def _make(self, job: GenerationJob, due_s: float) -> dict[str, Any]:
        result = await self.hub.gate.clip(job, self.id, due_s)
        payload = await self.hub.encode(result)
        payload["timings"] = {
            key: round(value, 4) for key, value in getattr(result, "timings", {}).items()
        }
        return payload

    async def _report_failure(
        self, index: int, failure: ApiError, reader: asyncio.Task[None]
    ) -> str:
        """Tell the listener; undo a steer that made the clip impossible (redo), retry a
        clip the service could not make now, end the session on settings it cannot take."""
        with contextlib.suppress(Exception):
            await self.websocket.send_json(
                {
                    "type": "error",
                    "status": failure.status,
                    "field": failure.field,
                    "message": failure.message,
                    "retry_after_s": failure.retry_after_s,
                }
            )
        if failure.status >= 500:
            delay = failure.retry_after_s or self.hub.config.retry_delay_s
            await self._sleep(min(delay, 5.0), reader)
            return "retry"
        if self._before_steer is not None and self._before_steer[0] <= index:
            self.walk = self._before_steer[1]
            self._before_steer = None
            self.steers.clear()
            return "redo"
        with contextlib.suppress(Exception):
            await self.websocket.close(POLICY_VIOLATION, failure.message[:120])
        return "gone"

    async def _sleep(self, seconds: float, reader: asyncio.Task[None]) -> None:
        """Wait ``seconds``, or less if the listener reports, steers or leaves."""
        self.wake.clear()
        waker = asyncio.create_task(self.wake.wait())
        drained = asyncio.create_task(self.hub.draining.wait())
        try:
            await asyncio.wait({waker, reader, drained}, timeout=max(0.0, seconds))
        finally:
            waker.cancel()
            drained.cancel()

    async def _read(self) -> None:
        """Step 4: the listener's messages, until they leave."""
        while True:
            try:
                raw = await self.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                message = _parse(raw)
                kind = message.get("type")
                if kind == "steer":
                    self._steer(JamSteer.model_validate(_without_type(message)))
                elif kind == "played":
                    played = Played.model_validate(message)
                    self.clock.report(played.position_s, time.monotonic())
                elif kind == "stop":
                    return
                else:
                    raise _BadMessage("type", "expected 'steer', 'played' or 'stop'")
            except _BadMessage as bad:
                await self._error(bad.field, bad.message)
            except ValidationError as error:
                await self._error(_field_of(error), error.errors()[0]["msg"])
            except ApiError as error:
                await self._error(error.field or "message", error.message)
            self.wake.set()

    def _steer(self, steer: JamSteer) -> None:
        trial = copy.deepcopy(self.walk)
        trial.steer(steer)
        self.hub.gate.check(trial.next_job())  # an unknown image id: refused, not applied
        if self._before_steer is None:
            self._before_steer = (self.walk.clips, copy.deepcopy(self.walk))
        self.walk.steer(steer)
        self.steers.append((time.monotonic(), self.walk.clips))

    async def _error(self, field: str, message: str) -> None:
        await self.websocket.send_json(
            {"type": "error", "status": 400, "field": field, "message": message}
        )


def _without_type(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key != "type"}


def _prompt_of(prompt_input: Any) -> dict[str, Any]:
    return {"prompt": prompt_input.prompt, "seed": prompt_input.seed}
