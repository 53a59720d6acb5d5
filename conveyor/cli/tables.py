"""Tables and progress on the terminal, drawn by rich.

On a terminal a table fits its width; piped, it is never wrapped, so each row stays one
line that `grep`, `awk` and `cut` can read.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

PIPED_WIDTH = 1000


def _console(stream: object) -> Console:
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(file=stream, width=None if tty else PIPED_WIDTH)  # type: ignore[arg-type]


def print_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A table to stdout: a header, then a line per row."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, no_wrap=True, overflow="fold")
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    _console(sys.stdout).print(table)


def progress(description: str) -> Progress:
    """A progress bar on stderr: done of total, and the time so far."""
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(sys.stderr),
    )
