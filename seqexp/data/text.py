"""Small helpers shared by the text-format readers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv


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


def read_delimited(path: Path, column_names: list[str], delimiter: str,
                   column_types: dict[str, pa.DataType], skipped: skipped_row_counter,
                   skip_rows: int = 0, **convert_options) -> pa.Table:
    """pyarrow's multithreaded CSV reader without quoting (names may hold quotes), keeping the
    columns of `column_types`, skipping the first `skip_rows` lines (a header) and malformed
    rows into `skipped`."""
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=column_names, block_size=1 << 24,
                                       skip_rows=skip_rows),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, quote_char=False, invalid_row_handler=skipped
        ),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(column_types), column_types=column_types, **convert_options
        ),
    )
