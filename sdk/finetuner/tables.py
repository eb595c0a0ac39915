"""Printing the SDK's and the CLI's rich tables whole.

Run, experiment and model names are what users copy into the next call or command: a table of them is
never cut to a narrow terminal (rich would end a cell with an ellipsis). When the terminal is narrower
than the table, the table is printed at the width it needs and the terminal wraps its lines.
"""

from __future__ import annotations

from typing import Any


def print_whole(table: Any, console: Any = None) -> None:
    """Print ``table`` (a rich renderable) on ``console``; without one, on the terminal, never cutting a cell.
    A console the caller gives is used as it is (its width is the caller's choice)."""
    from rich.cells import cell_len
    from rich.console import Console

    if console is not None:
        console.print(table)
        return
    console = Console()
    title = getattr(table, 'title', None)
    if isinstance(title, str):  # a run name in the title is not folded either: the table is as wide as it
        table.min_width = max(table.min_width or 0, cell_len(title))
    needed = Console(width=10_000).measure(table).maximum
    (console if console.width >= needed else Console(width=needed)).print(table)
