"""Progress of the library's long loops, shown by whoever listens (the CLI's progress bars).

A loop calls ``report(stage, done, total)`` after each unit of work; it costs nothing
unless a listener is installed for the current context with ``listening_to``::

    with listening_to(lambda stage, done, total: bar.update(done, total=total)):
        audio_from_image(image)  # Griffin-Lim reports each iteration
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

Listener = Callable[[str, int, int], None]  # (stage, done, total)

_LISTENER: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "riffusion_progress_listener", default=None
)


def report(stage: str, done: int, total: int) -> None:
    """Tell the listener, if any, that ``done`` of ``total`` units of ``stage`` are done."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(stage, done, total)


@contextlib.contextmanager
def listening_to(listener: Listener) -> Iterator[None]:
    """Send this context's progress reports to ``listener`` while the block runs."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
