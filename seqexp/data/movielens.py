"""MovieLens ratings.dat (ML-10M, ML-1M): `UserID::MovieID::Rating::Timestamp` per line."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from seqexp.data.interactions import Interactions, dense_codes
from seqexp.data.text import first_line, read_delimited, skipped_row_counter
from seqexp.errors import SeqexpError

log = logging.getLogger(__name__)

FORMAT = "UserID::MovieID::Rating::Timestamp"
# Splitting on a single ':' turns `a::b::c::d` into seven fields with empty ones in between,
# which pyarrow's multithreaded CSV reader can parse without a Python loop.
_COLUMNS = ["user", "_a", "item", "_b", "rating", "_c", "timestamp"]


def read_movielens(path: Path) -> Interactions:
    """Parse a ratings.dat file; every rating is one implicit interaction, in file order."""
    path = Path(path)
    skipped = skipped_row_counter()
    try:
        # The fields between single colons must be empty (null-typed costs nothing):
        # `1:x:2:y:...` is not a `::` line.
        table = read_delimited(path, _COLUMNS, ":", {
            "user": pa.int64(), "_a": pa.null(), "item": pa.int64(), "_b": pa.null(),
            "_c": pa.null(), "timestamp": pa.int64(),
        }, skipped)
    except pa.ArrowInvalid as exc:
        raise SeqexpError(
            f"{path}: not a MovieLens ratings file ({FORMAT}); first line reads "
            f"{first_line(path)!r} ({str(exc).splitlines()[0]})"
        ) from None
    if table.num_rows == 0:
        if skipped.count:
            raise SeqexpError(
                f"{path}: no line matches the MovieLens format {FORMAT}; first line reads "
                f"{first_line(path)!r}. Use dataset=csv for other layouts"
            )
        raise SeqexpError(f"{path}: the file holds no ratings")
    if skipped.count:
        log.warning("%s: skipped %d malformed lines (first: %s)", path, skipped.count,
                    skipped.first)
    # One column at a time, each dropped from the table once copied out, so that at most one
    # column exists twice; then hand the freed parse buffers back to the system (pyarrow's
    # allocator would otherwise keep them for the rest of the run).
    columns = {}
    for name in ("user", "item", "timestamp"):
        columns[name] = table.column(name).to_numpy()
        table = table.drop_columns([name])
    del table
    pa.default_memory_pool().release_unused()
    return Interactions(
        user=columns["user"],
        item=dense_codes(columns["item"]),
        timestamp=columns["timestamp"],
        source=str(path),
        skipped_lines=skipped.count,
    )
