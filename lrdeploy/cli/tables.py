"""Tables that fit the terminal, in four formats: ``table`` (rich), ``plain``, ``csv`` (and ``json``, which
the CLI prints from the result itself).

A `Sheet` holds plain text: model strings unescaped, no markup. Printing it makes every cell printable
(`lrdeploy.text`), and for ``table``/``plain`` fits it to the console's width instead of letting cells wrap
a word per line: columns that repeat nothing (all ``-``) go first, then low-value columns (highest
``drop`` first), and the name column gets what is left, names cut in the middle so distinct names stay
distinct. Long reasons never sit in a column: a row points to a numbered note below the table.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lrdeploy.text import printable, shorten_all

__all__ = ["FORMATS", "Column", "Sheet", "print_line", "print_sheet"]

FORMATS = ("table", "plain", "csv", "json")
#: The name column keeps at least this many characters before the fixed columns are dropped.
MIN_NAME = 28
_EMPTY = ("", "-")


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False
    drop: int = 0  # 0: always shown; the highest is dropped first when the table is too wide
    name: bool = False  # the column of names, cut in the middle to fit


@dataclass
class Sheet:
    title: str
    columns: list[Column]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str | None] = field(default_factory=list)  # per row; numbered below the table
    footer: list[str] | None = None
    styles: list[str | None] = field(default_factory=list)  # per row (table format only)
    note_column: int = -1  # the cell a row's note marker follows
    records: list[dict] | None = None  # for csv: the unrounded values, one dict per row

    def add(self, cells: Sequence[object], note: str | None = None, style: str | None = None) -> None:
        self.rows.append([str(c) for c in cells])
        self.notes.append(note)
        self.styles.append(style)


def print_line(console: Console, text: str, style: str | None = None, fmt: str = "table") -> None:
    """One line of model-controlled text: escaped, never read as markup, wrapped at the console's width."""
    safe = printable(text, limit=None)
    if fmt == "plain":
        for line in textwrap.wrap(safe, console.width, subsequent_indent="  ") or [""]:
            console.out(line, highlight=False)
        return
    console.print(Text(safe, style=style or ""), highlight=False, overflow="fold")


def _numbered(sheet: Sheet) -> tuple[list[str], list[str]]:
    """A marker per row (`` (n)`` or empty) and the distinct notes in order."""
    numbers: dict[str, int] = {}
    markers = []
    for note in sheet.notes:
        if note is None:
            markers.append("")
            continue
        number = numbers.setdefault(note, len(numbers) + 1)
        markers.append(f" ({number})")
    return markers, list(numbers)


def _natural(sheet: Sheet, rows: list[list[str]], footer: list[str] | None) -> list[int]:
    lines = [*rows, footer] if footer else rows
    return [max([len(c.header), *(len(line[i]) for line in lines)]) for i, c in enumerate(sheet.columns)]


def _fit(sheet: Sheet, rows: list[list[str]], natural: list[int], room: int) -> list[int]:
    """The columns shown: empty ones hidden, then the least valuable dropped until ``room`` holds them."""
    shown = [
        i
        for i, column in enumerate(sheet.columns)
        if column.name or column.drop == 0 or any(row[i] not in _EMPTY for row in rows)
    ]

    def needed(columns: list[int]) -> int:
        return sum(min(natural[i], MIN_NAME) if sheet.columns[i].name else natural[i] for i in columns)

    dropped = []
    while needed(shown) > room(len(shown)):
        droppable = [i for i in shown if sheet.columns[i].drop > 0]
        if not droppable:
            break
        dropped.append(max(droppable, key=lambda i: (sheet.columns[i].drop, i)))
        shown.remove(dropped[-1])
    for i in reversed(dropped[:-1]):  # a narrower column dropped earlier may fit again
        if needed(sorted([*shown, i])) <= room(len(shown) + 1):
            shown = sorted([*shown, i])
    return shown


def _prepared(
    sheet: Sheet, width: int, gap: int, edge: int
) -> tuple[list[int], list[list[str]], list[str] | None, list[str]]:
    """Columns shown, escaped rows with note markers and fitted names, the footer, the notes."""
    markers, notes = _numbered(sheet)
    rows = [[printable(c, limit=None) for c in row] for row in sheet.rows]
    for row, marker in zip(rows, markers, strict=True):
        row[sheet.note_column] += marker
    footer = [printable(c, limit=None) for c in sheet.footer] if sheet.footer else None
    natural = _natural(sheet, rows, footer)
    shown = _fit(sheet, rows, natural, lambda count: width - gap * max(0, count - 1) - edge)
    for i in (i for i in shown if sheet.columns[i].name):
        others = sum(natural[j] for j in shown if j != i)
        room = max(MIN_NAME, width - others - gap * (len(shown) - 1) - edge)
        for row, value in zip(rows, shorten_all([r[i] for r in rows], room), strict=True):
            row[i] = value
        if footer:
            footer[i] = footer[i][:room]
    return shown, rows, footer, notes


def print_sheet(sheet: Sheet, console: Console, fmt: str = "table") -> None:
    if fmt == "csv":
        _print_csv(sheet, console)
        return
    width = console.width
    gap, edge = (3, 4) if fmt == "table" else (2, 0)
    shown, rows, footer, notes = _prepared(sheet, width, gap, edge)
    if fmt == "table":
        table = Table(title=Text(printable(sheet.title, None)), title_justify="left", header_style="bold")
        for i in shown:
            column = sheet.columns[i]
            table.add_column(column.header, justify="right" if column.right else "left", no_wrap=True)
        for row, style in zip(rows, sheet.styles, strict=True):
            table.add_row(*(Text(row[i]) for i in shown), style=style)
        if footer:
            table.add_section()
            table.add_row(*(Text(footer[i]) for i in shown))
        console.print(table, overflow="ellipsis")
    else:
        print_line(console, sheet.title, fmt="plain")
        lines = [[sheet.columns[i].header for i in shown], *([row[i] for i in shown] for row in rows)]
        if footer:
            lines.append([footer[i] for i in shown])
        widths = [max(len(line[k]) for line in lines) for k in range(len(shown))]
        for line in lines:
            cells = [
                cell.rjust(w) if sheet.columns[i].right else cell.ljust(w)
                for cell, w, i in zip(line, widths, shown, strict=True)
            ]
            console.out("  ".join(cells).rstrip(), highlight=False)
    for number, note in enumerate(notes, 1):
        print_line(console, f"({number}) {note}", fmt=fmt)


def _print_csv(sheet: Sheet, console: Console) -> None:
    """Every column, full names and unrounded numbers where the sheet has them: data for a spreadsheet."""
    if sheet.records is not None:
        header = list(dict.fromkeys(key for record in sheet.records for key in record))
        rows = [[_csv_value(record.get(key)) for key in header] for record in sheet.records]
    else:
        header = [c.header for c in sheet.columns] + ["note"]
        rows = [[*row, note or ""] for row, note in zip(sheet.rows, sheet.notes, strict=True)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([printable(cell, limit=None) for cell in row] for row in rows)
    console.out(buffer.getvalue().rstrip("\n"), highlight=False)


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        joiner = "×" if all(isinstance(v, int) for v in value) else ";"
        return joiner.join(str(v) for v in value)
    return str(value)
