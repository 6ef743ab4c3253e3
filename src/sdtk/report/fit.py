"""Tables that fit the terminal: columns left out by priority, one column shortened in the middle.

rich shrinks a table that is too wide by wrapping its cells, which breaks labels and hashes over
several lines (unreadable at 80 columns); here the layout is chosen for the width it is printed
at instead: every kept cell stays on one line."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from sdtk.report.terminal_text import TerminalText

GAP = 2  # cells between columns
COMFORTABLE = 20  # a shortened name keeps at least this many cells while other columns can go


def shorten_middle(value: str, width: int) -> str:
    """`value` in at most `width` cells, its middle replaced by an ellipsis when too long."""
    if cell_len(value) <= width:
        return value
    if width <= 1:
        return "…"[:max(width, 0)]
    keep_tail = (width - 1) // 2
    head, tail = value[:width - 1 - keep_tail], value[len(value) - keep_tail:] if keep_tail else ""
    while cell_len(head) + cell_len(tail) + 1 > width and head:
        head = head[:-1]
    return head + "…" + tail


@dataclass(frozen=True)
class Column:
    header: str
    drop_order: Optional[int] = None  # None: always shown; lower numbers are left out first
    shrink_to: Optional[int] = None  # this column may be shortened in the middle down to this width
    justify: str = "left"


class FittedTable:
    """A header row plus rows of plain strings (or Text), laid out for the printing width."""

    def __init__(self, columns: Sequence[Column], rows: Sequence[Sequence], show_header: bool = True):
        self.columns, self.rows, self.show_header = list(columns), [list(r) for r in rows], show_header

    def _natural(self, i: int) -> int:
        cells = [self.rows[r][i] for r in range(len(self.rows))]
        widths = [cell_len(c.plain if isinstance(c, Text) else str(c)) for c in cells]
        if self.show_header:
            widths.append(cell_len(self.columns[i].header))
        return max(widths, default=0)

    def layout(self, width: int) -> tuple:
        """(shown column indexes, the shrinkable column's width or None)."""
        shown = list(range(len(self.columns)))
        natural = [self._natural(i) for i in shown]
        droppable = sorted((c.drop_order, i) for i, c in enumerate(self.columns) if c.drop_order is not None)

        def need(cols, shrunk=None):
            return sum(shrunk if (shrunk is not None and self.columns[i].shrink_to) else natural[i] for i in cols) + GAP * (len(cols) - 1)

        shrink = next((i for i, c in enumerate(self.columns) if c.shrink_to), None)

        def room(cols):
            return width - need([i for i in cols if i != shrink]) - GAP

        while True:
            if need(shown) <= width:
                return shown, None
            # shorten the shrinkable column to a comfortable width before leaving columns out,
            # to its minimum only when nothing more can go
            if shrink is not None and room(shown) >= max(self.columns[shrink].shrink_to, COMFORTABLE):
                return shown, room(shown)
            if not droppable:
                if shrink is None:
                    return shown, None
                return shown, max(room(shown), self.columns[shrink].shrink_to)
            shown.remove(droppable.pop(0)[1])

    def __rich_console__(self, console, options):
        shown, shrunk = self.layout(options.max_width)
        table = Table(box=None, pad_edge=False, show_edge=False, show_header=self.show_header, padding=(0, GAP // 2))
        for i in shown:
            table.add_column(self.columns[i].header, no_wrap=True, justify=self.columns[i].justify)
        for row in self.rows:
            cells = []
            for i in shown:
                cell = row[i]
                if shrunk is not None and self.columns[i].shrink_to:
                    cell = shorten_middle(cell.plain if isinstance(cell, Text) else str(cell), shrunk)
                cells.append(cell if isinstance(cell, Text) else TerminalText(str(cell)))  # untrusted names: no control characters
            table.add_row(*cells)
        yield table


__all__: List[str] = ["Column", "FittedTable", "shorten_middle"]
