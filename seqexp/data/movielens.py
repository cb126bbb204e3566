"""MovieLens ratings files. One reader serves the three GroupLens layouts (`dataset.layout`):

- `ratings_dat` (ML-1M, ML-10M `ratings.dat`): `UserID::MovieID::Rating::Timestamp`, no header;
- `u_data` (ML-100K `u.data`): `user id TAB item id TAB rating TAB timestamp`, no header;
- `ratings_csv` (ML-20M `ratings.csv`): `userId,movieId,rating,timestamp` under that header line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from seqexp.core.errors import SeqexpError, message_line
from seqexp.data.interactions import Interactions, dense_codes
from seqexp.data.text import first_line, read_delimited, skipped_row_counter

log = logging.getLogger(__name__)

_ID = pa.int64()


@dataclass(frozen=True)
class Layout:
    """How one GroupLens ratings file is laid out."""

    description: str  # what a line looks like, for error messages
    delimiter: str
    columns: list[str]
    # Columns to convert (the rest, the rating included, are not read): user, item, timestamp,
    # and for `::` the empty fields between the colons.
    types: dict[str, pa.DataType]
    header: str | None = None  # a required first line, skipped


LAYOUTS: dict[str, Layout] = {
    # Splitting on a single ':' turns `a::b::c::d` into seven fields with empty ones in between,
    # which pyarrow's multithreaded CSV reader can parse without a Python loop. The fields
    # between single colons must be empty (null-typed costs nothing): `1:x:2:y:...` is not a
    # `::` line.
    "ratings_dat": Layout(
        "UserID::MovieID::Rating::Timestamp", ":",
        ["user", "_a", "item", "_b", "rating", "_c", "timestamp"],
        {"user": _ID, "_a": pa.null(), "item": _ID, "_b": pa.null(), "_c": pa.null(),
         "timestamp": _ID},
    ),
    "u_data": Layout(
        "user id<TAB>item id<TAB>rating<TAB>timestamp", "\t",
        ["user", "item", "rating", "timestamp"], {"user": _ID, "item": _ID, "timestamp": _ID},
    ),
    "ratings_csv": Layout(
        "userId,movieId,rating,timestamp", ",",
        ["user", "item", "rating", "timestamp"], {"user": _ID, "item": _ID, "timestamp": _ID},
        header="userId,movieId,rating,timestamp",
    ),
}


def read_movielens(path: Path, layout: str) -> Interactions:
    """Parse a GroupLens ratings file; every rating is one implicit interaction, in file order.

    Lines with the wrong number of fields are skipped and counted; a file whose ids are not
    integers, or a `ratings_csv` file without its header, is an error naming the file.
    """
    path = Path(path)
    spec = LAYOUTS[layout]
    what = f"MovieLens ratings file ({spec.description})"
    if spec.header is not None and path.stat().st_size:
        head = first_line(path).lstrip("\ufeff").strip()
        if head != spec.header:
            raise SeqexpError(f"{path}: not a {what}: the first line must be the header "
                              f"{spec.header!r} but reads {head!r}")
    skipped = skipped_row_counter()
    try:
        table = read_delimited(path, spec.columns, spec.delimiter, spec.types, skipped,
                               skip_rows=int(spec.header is not None))
    except pa.ArrowInvalid as exc:
        raise SeqexpError(
            f"{path}: not a {what}; first line reads {first_line(path)!r} "
            f"({message_line(exc)})"
        ) from None
    # An empty user, item or timestamp field reads as null: malformed like a wrong field count.
    user, item, stamp = (pc.is_valid(table.column(c)) for c in ("user", "item", "timestamp"))
    complete = pc.and_(pc.and_(user, item), stamp)
    empty_fields = table.num_rows - (pc.sum(complete).as_py() or 0)
    if empty_fields:
        table = table.filter(complete)
        skipped.count += empty_fields
        skipped.first = skipped.first or "a line with an empty user, item or timestamp"
    if table.num_rows == 0:
        if skipped.count:
            raise SeqexpError(
                f"{path}: no line matches the {what}; first line reads "
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
    users, user_labels = dense_codes(columns["user"])
    items, item_labels = dense_codes(columns["item"])
    return Interactions(
        user=users, user_labels=user_labels,
        item=items, item_labels=item_labels,
        timestamp=columns["timestamp"],
        source=str(path),
        skipped_lines=skipped.count,
    )
