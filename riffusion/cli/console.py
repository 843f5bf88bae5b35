"""The CLI's terminal side: messages and progress bars go to stderr (stdout is for results)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap: messages stay on one line whatever the terminal width (logs and tests parse them).
stderr = Console(stderr=True, soft_wrap=True)


def progress_bar(time_remaining: bool = False) -> Progress:
    """A bar per task: description, bar, done/total, time elapsed (and left, if asked)."""
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    if time_remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=stderr)
