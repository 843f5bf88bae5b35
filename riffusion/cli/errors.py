"""Expected failures of a command as one ``Error: ...`` line and exit code 1, not a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click


@contextlib.contextmanager
def friendly_errors(*expected: type[Exception]) -> Iterator[None]:
    """Turn ``expected`` failures into click errors: the message's first line, exit code 1.

    A context manager, or a decorator of a whole command: ``@friendly_errors(ValueError)``.
    """
    try:
        yield
    except expected as error:
        text = str(error).strip()
        raise click.ClickException(text.splitlines()[0] if text else repr(error)) from error
