"""Expected failures of a command as one ``Error: ...`` line and exit code 1, not a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click


@contextlib.contextmanager
def friendly_errors(*expected: type[Exception]) -> Iterator[None]:
    """Turn ``expected`` failures into click errors (one line, exit code 1)."""
    try:
        yield
    except expected as error:
        raise click.ClickException(str(error)) from error
