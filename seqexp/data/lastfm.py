"""Celma's LastFM-1K listening log.

`userid-timestamp-artid-artname-traid-traname.tsv`: TAB separated, no header, ISO-8601 UTC times,
each user's rows newest-first, MusicBrainz ids often empty, and a few malformed lines.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqexp.core.errors import SeqexpError
from seqexp.data.interactions import Interactions
from seqexp.data.text import first_line, read_delimited, skipped_row_counter

log = logging.getLogger(__name__)

_COLUMNS = ["user", "timestamp", "artist_id", "artist", "track_id", "track"]
ITEM_KINDS = ("track", "artist")


def read_lastfm(path: Path, *, item: str) -> Interactions:
    """Parse the TSV; malformed lines (wrong field count, bad time, no artist) are skipped, counted.

    Rows are returned oldest-first: the file lists each user newest-first, so reversing it makes
    the row-order tie-break for equal timestamps follow the listening order.
    """
    path = Path(path)
    skipped = skipped_row_counter()
    try:
        table = read_delimited(
            path, _COLUMNS, "\t", {name: pa.string() for name in ("user", "timestamp", "artist",
                                                                  "track")},
            skipped, strings_can_be_null=False,
        )
    except pa.ArrowInvalid as exc:
        raise SeqexpError(f"{path}: cannot read as LastFM-1K TSV ({exc})") from None
    if table.num_rows == 0 and skipped.count == 0:
        raise SeqexpError(f"{path}: the file holds no listening events")
    seconds = pc.strptime(
        table.column("timestamp"), format="%Y-%m-%dT%H:%M:%SZ", unit="s", error_is_null=True
    )
    artist = table.column("artist")
    valid = pc.and_(pc.is_valid(seconds), pc.greater(pc.utf8_length(artist), 0))
    n_bad = table.num_rows - pc.sum(valid).as_py() if table.num_rows else 0
    if n_bad == table.num_rows:  # also when every line had a wrong field count
        raise SeqexpError(
            f"{path}: no line matches the LastFM-1K layout (userid, ISO-8601 time, artist id, "
            f"artist, track id, track; TAB separated); first line reads {first_line(path)!r}"
        )
    table = table.append_column("seconds", seconds).filter(valid)
    if item == "track":
        # Names, not MBIDs: the ids are empty for a large share of the rows.
        key = pc.binary_join_element_wise(table.column("artist"), table.column("track"), "\t")
    else:
        key = table.column("artist")
    total_skipped = skipped.count + n_bad
    wrong_fields = skipped.count - skipped.not_utf8
    if total_skipped:
        log.warning("%s: skipped %d malformed lines (%d with a wrong field count, %d not UTF-8, "
                    "%d with a bad time or no artist)", path, total_skipped,
                    wrong_fields, skipped.not_utf8, n_bad)
    reverse = slice(None, None, -1)
    return Interactions(
        **_encoded("user", table.column("user"), reverse),
        **_encoded("item", key, reverse),
        timestamp=table.column("seconds").cast(pa.int64()).to_numpy()[reverse],
        source=str(path),
        skipped_lines=total_skipped,
        notes={"lines_wrong_field_count": wrong_fields,
               "lines_not_utf8": skipped.not_utf8, "lines_bad_time_or_artist": n_bad},
    )


def _encoded(name: str, column: pa.ChunkedArray, order: slice) -> dict[str, np.ndarray]:
    """{name: codes in `order`, name_labels: the distinct values} of a string column."""
    encoded = column.combine_chunks().dictionary_encode()
    return {name: encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)[order],
            f"{name}_labels": np.asarray(encoded.dictionary.to_pylist(), dtype=str)}
