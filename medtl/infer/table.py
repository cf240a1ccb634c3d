"""An append-only results table that survives being killed: CSV or JSON Lines.

Each batch of rows is appended with one write, flushed and synced; on re-opening, a trailing
partial line (a kill mid-write) is cut off, and the finished rows' keys tell the caller what
is already done.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

FORMATS = ("csv", "jsonl")


def _cut_partial_line(path: Path) -> None:
    with open(path, "rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)


def read_rows(path: Path, fmt: str) -> list[dict]:
    """The complete rows of a table file (an empty list when it does not exist)."""
    if not path.is_file():
        return []
    _cut_partial_line(path)
    with open(path, newline="") as handle:
        if fmt == "csv":
            return list(csv.DictReader(handle))
        return [json.loads(line) for line in handle if line.strip()]


class ResultTable:
    """Rows with fixed ``columns`` appended to ``path``; reopening resumes where it stopped."""

    def __init__(self, path: str | Path, columns: Sequence[str], fmt: str = "csv") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format '{fmt}', choose one of {FORMATS}")
        self.path = Path(path)
        self.columns = list(columns)
        self.fmt = fmt
        self.rows = read_rows(self.path, fmt)
        if self.rows and list(self.rows[0]) != self.columns:
            raise ValueError(
                f"{self.path} holds results with other columns {list(self.rows[0])}; "
                f"expected {self.columns}. Choose another --out or delete the file."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self._write(self._header())

    def _header(self) -> str:
        if self.fmt != "csv":
            return ""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(self.columns)
        return buffer.getvalue()

    def _write(self, text: str) -> None:
        with open(self.path, "a", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, rows: Iterable[dict]) -> None:
        """Append finished rows in one write."""
        rows = list(rows)
        if not rows:
            return
        buffer = io.StringIO()
        if self.fmt == "csv":
            csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n").writerows(rows)
        else:
            buffer.writelines(json.dumps({c: row[c] for c in self.columns}) + "\n" for row in rows)
        self._write(buffer.getvalue())
        self.rows.extend(rows)


def write_table(path: str | Path, columns: Sequence[str], rows: Iterable[dict], fmt: str = "csv") -> None:
    """Write a whole table atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    table = ResultTable(tmp, columns, fmt)
    table.append(rows)
    os.replace(tmp, path)
