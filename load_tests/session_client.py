"""A listener on a ``/session`` WebSocket that plays in real time and counts its underruns.

The client a Python program (or a load test) uses to listen: it opens a session,
plays each clip as it arrives (in time, not sound: nothing is decoded), reports its
playback position to the server, and records every underrun, a clip that arrived
after the previous audio ran out. Blocking, on ``websocket-client``; under locust's
gevent it yields like any socket.

    listener = SessionListener("http://127.0.0.1:3000", {"prompt": "jazz", "seed": 1})
    accepted = listener.open()              # {"type": "accepted", ...} or "refused"
    for clip in listener.clips(count=8):    # clip messages, as they arrive
        print(clip["index"], clip["alpha"], clip["end"]["prompt"])
        if clip["index"] == 3:
            listener.steer("church bells on sunday")
    listener.close()
    print(listener.report)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import websocket

SESSION_PATH = "/session"


def session_url(base_url: str) -> str:
    """``ws(s)://host:port/session`` for a service at ``base_url`` (http or https)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + SESSION_PATH
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + SESSION_PATH
    return base + SESSION_PATH


@dataclass
class ListenerReport:
    """What one listener heard."""

    accepted: bool | None = None
    refused_message: str = ""
    open_s: float = 0.0  # from connecting to accepted/refused
    first_clip_s: float | None = None  # from accepted to the first clip
    clips: int = 0
    audio_s: float = 0.0
    underruns: list[float] = field(default_factory=list)  # seconds of silence each
    errors: list[dict[str, Any]] = field(default_factory=list)
    ended_by: str = ""  # "client", "reconnect", "closed"

    @property
    def underrun_s(self) -> float:
        return sum(self.underruns)


class SessionListener:
    """One listener: ``open``, then ``clips`` (playing each in real time), ``steer``, ``close``."""

    def __init__(
        self,
        base_url: str,
        settings: dict[str, Any],
        api_key: str | None = None,
        timeout_s: float = 120.0,
        report_every_s: float = 1.0,
        playback_speed: float = 1.0,
    ) -> None:
        if playback_speed <= 0:
            raise ValueError(f"playback_speed must be positive, got {playback_speed}")
        self.url = session_url(base_url)
        self.settings = settings
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.report_every_s = report_every_s
        # Below 1: a slow listener (it reports its true position, which the server follows).
        self.playback_speed = playback_speed
        self.report = ListenerReport()
        self.socket: websocket.WebSocket | None = None
        self._playing_since: float | None = None  # when the current run of audio began
        self._played_before_s = 0.0  # audio played before that run
        self._dry_at: float | None = None  # when the buffered audio runs out
        self._reported_at = 0.0
        self._accepted_at = 0.0

    def open(self) -> dict[str, Any]:
        """Connect and send the start message; the server's answer (accepted or refused)."""
        began = time.monotonic()
        self.socket = websocket.create_connection(self.url, timeout=self.timeout_s)
        start = {"type": "start", **self.settings}
        if self.api_key:
            start["api_key"] = self.api_key
        self.socket.send(json.dumps(start))
        answer = self._receive()
        self.report.open_s = time.monotonic() - began
        self.report.accepted = answer.get("type") == "accepted"
        if not self.report.accepted:
            self.report.refused_message = str(answer.get("message", answer))
            self.report.ended_by = "closed"
            self._close_socket()
        self._accepted_at = time.monotonic()
        return answer

    def clips(self, count: int | None = None, seconds: float | None = None) -> Iterator[dict]:
        """Clip messages as they arrive, each "played" from when the previous one ends."""
        ends = None if seconds is None else time.monotonic() + seconds
        received = 0
        while self.socket is not None and (count is None or received < count):
            if ends is not None and time.monotonic() >= ends:
                return
            self._report_position()
            if self._dry_at is not None:  # wake in time to report the position
                self.socket.settimeout(max(0.05, min(self.report_every_s, self.timeout_s)))
            try:
                message = self._receive()
            except websocket.WebSocketTimeoutException:
                if self._dry_at is None:
                    raise
                continue
            except websocket.WebSocketConnectionClosedException:
                self.report.ended_by = self.report.ended_by or "closed"
                self.socket = None
                return
            kind = message.get("type")
            if kind == "clip":
                self._play(message)
                received += 1
                yield message
            elif kind == "reconnect":
                self.report.ended_by = "reconnect"
                self._close_socket()
                return
            elif kind == "error":
                self.report.errors.append(message)

    def steer(self, prompt: str, **fields: Any) -> None:
        """Ask for ``prompt`` (and optionally seed_image_id, mask_image_id) from the next clip."""
        self._send({"type": "steer", "prompt": prompt, **fields})

    def close(self) -> None:
        if self.socket is not None:
            self.report.ended_by = self.report.ended_by or "client"
            self._close_socket()

    # --- playback --------------------------------------------------------------------------------

    def _play(self, clip: dict[str, Any]) -> None:
        now = time.monotonic()
        duration = float(clip["duration_s"])
        lasts_s = duration / self.playback_speed
        if self._dry_at is None:
            self.report.first_clip_s = now - self._accepted_at
            self._playing_since, self._dry_at = now, now + lasts_s
        elif now > self._dry_at:  # silence since _dry_at: a real player loops or stops
            self.report.underruns.append(now - self._dry_at)
            self._played_before_s = self.report.audio_s
            self._playing_since, self._dry_at = now, now + lasts_s
        else:
            self._dry_at += lasts_s
        self.report.clips += 1
        self.report.audio_s += duration

    def position_s(self, now: float) -> float:
        """Seconds of the session's audio played by ``now``."""
        if self._playing_since is None:
            return 0.0
        played = (now - self._playing_since) * self.playback_speed
        return min(self.report.audio_s, self._played_before_s + played)

    def _report_position(self) -> None:
        now = time.monotonic()
        if self._playing_since is not None and now - self._reported_at >= self.report_every_s:
            self._reported_at = now
            self._send({"type": "played", "position_s": round(self.position_s(now), 3)})

    # --- the socket ------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self.socket is not None:
            self.socket.send(json.dumps(message))

    def _receive(self) -> dict[str, Any]:
        assert self.socket is not None
        raw = self.socket.recv()
        if not raw:
            raise websocket.WebSocketConnectionClosedException("closed by the server")
        message = json.loads(raw)
        if not isinstance(message, dict):
            raise ValueError(f"not a message: {raw[:80]!r}")
        return message

    def _close_socket(self) -> None:
        if self.socket is not None:
            try:
                self.socket.close()
            finally:
                self.socket = None
