"""A listener's playback clock: how much audio they have buffered, and when it runs dry.

The server sends clips; the listener plays them back to back and reports how far it
has played. ``PlaybackClock`` keeps both sides and answers, at any moment:

1. ``played_s``: the last reported position, moved on at real-time speed since the
   report, never past the audio delivered (a listener who ran dry stalls there);
2. ``ahead_s``: audio delivered but not yet played (the listener's buffer);
3. ``dry_at``: when that buffer runs out if nothing more arrives, the deadline of
   the next clip (less a margin for encoding and the network);
4. ``deliver``: a clip arrived; if the buffer had already run dry, that was an
   underrun of ``late_s`` seconds, after which playback resumes with the new clip.

Playback is taken to start when the first clip arrives, until the listener says
otherwise. Times are ``time.monotonic()`` seconds, passed in so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Underrun:
    """The listener's buffer ran dry for ``seconds`` before clip ``clip_index`` arrived."""

    clip_index: int
    seconds: float


@dataclass
class PlaybackClock:
    """One listener's buffer, from clips delivered and positions reported."""

    delivered_s: float = 0.0  # audio sent so far
    clips_delivered: int = 0
    _position_s: float = 0.0  # played at ``_position_at``
    _position_at: float | None = None  # None until playback starts
    underruns: list[Underrun] = field(default_factory=list)

    @property
    def playing(self) -> bool:
        return self._position_at is not None

    def played_s(self, now: float) -> float:
        """Audio played by ``now``: the last position moved on in real time, capped at delivery."""
        if self._position_at is None:
            return 0.0
        return min(self.delivered_s, self._position_s + max(0.0, now - self._position_at))

    def ahead_s(self, now: float) -> float:
        """Audio buffered ahead of the listener at ``now``."""
        return self.delivered_s - self.played_s(now)

    def dry_at(self, now: float) -> float:
        """When the buffer runs out if nothing more arrives (``now`` if it already has)."""
        return now + self.ahead_s(now)

    def deliver(self, duration_s: float, now: float) -> Underrun | None:
        """Count a clip of ``duration_s`` sent at ``now``; the underrun it ended, if any."""
        if duration_s <= 0:
            raise ValueError(f"a clip lasts a positive time, got {duration_s}")
        underrun = None
        if self._position_at is None:
            self._position_at = now  # the first clip starts playing as it arrives
        else:
            dry_at = self._position_at + (self.delivered_s - self._position_s)
            if now > dry_at:  # silence (or the last clip looped) since dry_at
                underrun = Underrun(self.clips_delivered, now - dry_at)
                self.underruns.append(underrun)
                self._position_s, self._position_at = self.delivered_s, now
        self.delivered_s += duration_s
        self.clips_delivered += 1
        return underrun

    def report(self, position_s: float, now: float) -> None:
        """The listener has played ``position_s`` seconds of the session's audio at ``now``."""
        if position_s < 0:
            raise ValueError(f"position_s must not be negative, got {position_s}")
        self._position_s = min(position_s, self.delivered_s)
        self._position_at = now
