"""Small helpers shared by the text-format readers."""

from __future__ import annotations

from pathlib import Path


class skipped_row_counter:  # noqa: N801 - used like a function by pyarrow
    """A pyarrow `invalid_row_handler` that skips malformed rows and remembers how many."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def __call__(self, row) -> str:  # pyarrow.csv.InvalidRow
        self.count += 1
        if self.first is None:
            where = f"line {row.number}: " if row.number is not None else ""
            self.first = f"{where}{row.text[:80]!r}"
        return "skip"


def first_line(path: Path, limit: int = 80) -> str:
    with open(path, "rb") as handle:
        return handle.readline(limit).decode("utf-8", "replace").rstrip("\r\n")
