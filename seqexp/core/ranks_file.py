"""The per-event ranks file (test_ranks.parquet) and its id maps (test_ranks_ids.parquet):
the format a run writes (seqexp.run.artifacts) and how they are read back, with pyarrow and
numpy only, so that seqexp-report reads them without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RANKS_FORMAT = "seqexp.ranks/1"
RANKS_FILE = "test_ranks.parquet"
ID_MAPS_FILE = "test_ranks_ids.parquet"


def read_ranks(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The columns of a test_ranks.parquet as int64 arrays, and its metadata."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"seqexp", b"{}"))
    return {name: table.column(name).to_numpy().astype(np.int64)
            for name in table.column_names}, meta


def read_id_maps(path: Path) -> dict[str, np.ndarray]:
    """{"user": raw ids by user index, "item": raw ids by item code} from write_id_maps."""
    import pyarrow.parquet as pq

    frame = pq.read_table(path).to_pandas()
    return {kind: part.sort_values("code")["raw_id"].to_numpy(dtype=str)
            for kind, part in frame.groupby("kind", observed=True)}
