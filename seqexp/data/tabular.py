"""Any CSV/TSV/Parquet file with user, item and timestamp columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from seqexp.core.errors import SeqexpError, message_line
from seqexp.data.interactions import Interactions
from seqexp.data.text import first_non_utf8_line

# Largest time (seconds, or any unit the file uses) accepted from a numeric column: every integer
# up to it is exact in float64, and differences of two stay far from int64's overflow.
MAX_ABS_TIME = 2**53


def read_table(
    path: Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    sep: str | None,
) -> Interactions:
    """Read a table; timestamps may be numbers (seconds) or date-time strings."""
    path = Path(path)
    columns = {"dataset.user_col": user_col, "dataset.item_col": item_col,
               "dataset.time_col": time_col}
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            if sep is None:
                sep = "," if path.suffix.lower() == ".csv" else "\t"
            frame = pd.read_csv(path, sep=sep, engine="pyarrow" if len(sep) == 1 else "python")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise SeqexpError(f"{path}: cannot read as a table ({message_line(exc)})") from None
    missing = [f"{key}={name!r}" for key, name in columns.items() if name not in frame.columns]
    if missing:
        raise SeqexpError(
            f"{path}: no column {', '.join(missing)}; the file has columns "
            f"{', '.join(map(str, frame.columns))}; set dataset.user_col/item_col/time_col"
        )
    if len(frame) == 0:
        raise SeqexpError(f"{path}: the file holds no rows")
    for name in columns.values():
        # pandas' pyarrow engine turns a text column holding bytes that are not UTF-8 into
        # Python bytes objects (every value of it) instead of failing.
        kind = pd.api.types.infer_dtype(frame[name], skipna=True)  # a scan in C
        if kind == "bytes" or (kind.startswith("mixed")
                               and frame[name].map(type).eq(bytes).any()):
            raise _not_utf8(path)
    complete = frame.dropna(subset=[user_col, item_col, time_col])
    frame, incomplete = complete, len(frame) - len(complete)
    users, user_labels = pd.factorize(frame[user_col])
    items, item_labels = pd.factorize(frame[item_col])
    return Interactions(
        user=users.astype(np.int64), user_labels=np.asarray(user_labels),
        item=items.astype(np.int64), item_labels=np.asarray(item_labels),
        timestamp=_seconds(frame[time_col], path, time_col),
        source=str(path),
        skipped_lines=incomplete,
    )


def _not_utf8(path: Path) -> SeqexpError:
    line = first_non_utf8_line(path)
    where = f"line {line} is" if line is not None else "some lines are"
    return SeqexpError(f"{path}: {where} not UTF-8 text; save the file as UTF-8 (for example "
                       f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix})")


def _seconds(column: pd.Series, path: Path, name: str) -> np.ndarray:
    """The time column as int64; `column` keeps the frame's index (row i is the file's line
    i + 2: one header line, counted from 1)."""
    if pd.api.types.is_bool_dtype(column):
        raise SeqexpError(f"{path}: column {name!r} (dataset.time_col) holds true/false values, "
                          "not times")
    if pd.api.types.is_numeric_dtype(column):
        integer = pd.api.types.is_integer_dtype(column)
        values = column.to_numpy(dtype=np.int64 if integer else np.float64)
        # Compared, not abs(): abs of int64's minimum overflows. NaN rows were dropped before.
        bad = ~((values <= MAX_ABS_TIME) & (values >= -MAX_ABS_TIME))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SeqexpError(
                f"{path}: line {int(column.index[row]) + 2}: {name}={values[row].item()!r} "
                f"(dataset.time_col) is not a time: numbers must be finite and within "
                f"±2**53; fix or remove the line")
        return values if integer else np.floor(values).astype(np.int64)
    try:
        stamps = pd.to_datetime(column, utc=True, format="ISO8601")
    except (ValueError, TypeError):
        raise SeqexpError(
            f"{path}: column {name!r} (dataset.time_col) holds neither numbers nor ISO-8601 times"
        ) from None
    # Unit-agnostic: pandas 3 may store other resolutions than nanoseconds.
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    return ((stamps - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
