"""Small helpers shared by the text-format readers."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

# Bytes that are not UTF-8, as Python's surrogateescape handler decodes them.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class skipped_row_counter:  # lower case: used like a function by pyarrow
    """A pyarrow `invalid_row_handler` that skips malformed rows and remembers how many."""

    def __init__(self) -> None:
        self.count = 0
        self.not_utf8 = 0  # of count: lines with bytes that are not UTF-8
        self.first: str | None = None
        self.poison: str | None = None  # what read_delimited put in place of such bytes

    def __call__(self, row) -> str:  # pyarrow.csv.InvalidRow
        self.count += 1
        bad_bytes = self.poison is not None and self.poison in row.text
        self.not_utf8 += bad_bytes
        if self.first is None:
            where = f"line {row.number}: " if row.number is not None else ""
            self.first = f"{where}not UTF-8" if bad_bytes else f"{where}{row.text[:80]!r}"
        return "skip"


def first_line(path: Path, limit: int = 80) -> str:
    with open(path, "rb") as handle:
        return handle.readline(limit).decode("utf-8", "replace").rstrip("\r\n")


def first_non_utf8_line(path: Path) -> int | None:
    """The number (from 1) of the first line of `path` that is not UTF-8, else None. For error
    messages only: a Python loop over the lines."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


class _NonUtf8LinesMalformed(io.RawIOBase):
    """A read-only view of a file in which every byte that is not UTF-8 becomes `poison` (more
    delimiters than a line has fields), so that the CSV reader sees such a line as one with the
    wrong number of fields and skips and counts it like any other malformed line. The file is
    read in whole lines, so a multi-byte character is never cut in two."""

    def __init__(self, path: Path, poison: str, block: int = 1 << 24) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed with this stream
        self._poison = poison
        self._block = block
        self._pending = memoryview(b"")  # slices of a view copy nothing

    def readable(self) -> bool:
        return True

    def _refill(self) -> None:
        chunk = self._file.read(self._block)
        if chunk and not chunk.endswith(b"\n"):
            chunk += self._file.readline()
        try:
            chunk.decode("utf-8")
            self._pending = memoryview(chunk)
        except UnicodeDecodeError:
            text = chunk.decode("utf-8", "surrogateescape")
            self._pending = memoryview(_ESCAPED_BYTE.sub(self._poison, text).encode("utf-8"))

    def readinto(self, buffer) -> int:
        if not self._pending:
            self._refill()
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


@contextmanager
def _decode_errors_caught() -> Iterator[list[BaseException]]:
    """pyarrow decodes a malformed row's text as UTF-8 before it calls the invalid-row handler;
    when that fails, the error is raised where nobody can catch it (Python prints "Exception
    ignored ...") and the read fails. Collect those errors quietly instead."""
    caught: list[BaseException] = []
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError):
            caught.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield caught
    finally:
        sys.unraisablehook = previous


def read_delimited(path: Path, column_names: list[str], delimiter: str,
                   column_types: dict[str, pa.DataType], skipped: skipped_row_counter,
                   skip_rows: int = 0, **convert_options) -> pa.Table:
    """pyarrow's multithreaded CSV reader without quoting (names may hold quotes), keeping the
    columns of `column_types`, skipping the first `skip_rows` lines (a header) and malformed
    rows into `skipped`.

    A line holding bytes that are not UTF-8 in a field that is read is malformed: the file is then
    read a second time through a filter that makes every such line one with the wrong number of
    fields, skipped and counted. (Fields that are not read, such as a MovieLens rating, are not
    checked.)"""

    def read(source) -> pa.Table:
        return pacsv.read_csv(
            source,
            read_options=pacsv.ReadOptions(column_names=column_names, block_size=1 << 24,
                                           skip_rows=skip_rows),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char=False, invalid_row_handler=skipped
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(column_types), column_types=column_types,
                **convert_options
            ),
        )

    with _decode_errors_caught() as caught:
        try:
            return read(path)
        except pa.ArrowInvalid as exc:
            if not (caught or "invalid UTF8" in str(exc) or "\ufffd" in str(exc)):
                raise
    skipped.count, skipped.first = 0, None
    skipped.poison = delimiter * (len(column_names) + 1)
    with _decode_errors_caught(), _NonUtf8LinesMalformed(path, skipped.poison) as stream:
        return read(stream)
