"""The one table renderer: fixed-width text for terminals and logs, or Markdown for reports and cards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render(head: Sequence[Any], rows: Sequence[Sequence[Any]], *, labels: int = 1, markdown: bool = False) -> str:
    """A table of ``head`` over ``rows``, every column as wide as its widest cell.

    Args:
        head: column titles.
        rows: one sequence of cells per line (any values: shown with ``str``).
        labels: leading columns aligned left (labels); the rest are aligned right (numbers).
            Markdown tables align every column left, as Markdown renders them anyway.
        markdown: ``| a | b |`` lines under a ``|---|`` rule instead of two-space-separated columns.

    Returns:
        The lines joined by newlines (no trailing newline).
    """
    cells = [[str(c) for c in head], *([str(c) for c in row] for row in rows)]
    if any(len(row) != len(cells[0]) for row in cells):
        raise ValueError(f"every row needs {len(cells[0])} cells")
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
        return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]])
    return "\n".join("  ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)
