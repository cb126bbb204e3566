"""Any CSV/TSV/Parquet file with user, item and timestamp columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from seqexp.data.interactions import Interactions
from seqexp.errors import SeqexpError


def read_table(
    path: Path,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
    sep: str | None = None,
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
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise SeqexpError(f"{path}: cannot read as a table ({str(exc).splitlines()[0]})") from None
    missing = [f"{key}={name!r}" for key, name in columns.items() if name not in frame.columns]
    if missing:
        raise SeqexpError(
            f"{path}: no column {', '.join(missing)}; the file has columns "
            f"{', '.join(map(str, frame.columns))}; set dataset.user_col/item_col/time_col"
        )
    if len(frame) == 0:
        raise SeqexpError(f"{path}: the file holds no rows")
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


def _seconds(column: pd.Series, path: Path, name: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy().astype(np.int64)
    try:
        stamps = pd.to_datetime(column, utc=True, format="ISO8601")
    except (ValueError, TypeError):
        raise SeqexpError(
            f"{path}: column {name!r} (dataset.time_col) holds neither numbers nor ISO-8601 times"
        ) from None
    # Unit-agnostic: pandas 3 may store other resolutions than nanoseconds.
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    return ((stamps - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
