"""What a run leaves beside its metrics: the contents of the best checkpoint (config, raw ids,
training histories: what seqexp.load needs), the per-event ranks file and its id maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seqexp.core.atomic import atomic_path
from seqexp.core.checkpoint import CHECKPOINT_FORMAT
from seqexp.core.ranks_file import RANKS_FORMAT
from seqexp.core.version import __version__
from seqexp.data.sequences import SequenceData
from seqexp.engine.evaluator import train_events
from seqexp.engine.metrics import RankCounts


def raw_id_strings(values: np.ndarray | None, count: int) -> list[str]:
    """The raw ids as strings, in code order; the codes themselves when there are none."""
    return [str(i) for i in range(count)] if values is None else [str(v) for v in values]


def checkpoint_contents(cfg: DictConfig, data: SequenceData) -> dict[str, Any]:
    """What the best checkpoint carries beside the weights: the resolved config, the raw ids
    (their codes' order) and every user's training events."""
    lengths = data.train_end - data.offsets[:-1]
    mask = data.train_mask()
    return {
        "format": CHECKPOINT_FORMAT,
        "seqexp_version": __version__,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "user_ids": raw_id_strings(data.user_ids, data.n_users),
        "item_ids": raw_id_strings(data.item_ids, data.n_items),
        "train_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
        "train_items": torch.from_numpy(data.items[mask].astype(np.int64)),
        "train_timestamps": torch.from_numpy(data.timestamps[mask].astype(np.int64)),
    }




def write_ranks(counts: RankCounts, data: SequenceData, path: Path,
                settings: dict | None = None) -> Path:
    """Write the per-event ranks as Parquet, one row per event sorted by (user, position):
    user (index of the user in the processed data), position (of the target in the user's
    sequence, 0 = first event), item (training-vocabulary code), rank_pessimistic,
    rank_optimistic and user_train_events (the user's history length), each in the smallest
    unsigned integer type that holds it. The file's metadata (key `seqexp`) holds the number
    of items, the tie policies and `settings` (e.g. eval.exclude_seen). Atomic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if counts.users is None or counts.positions is None or counts.targets is None:
        raise ValueError("write_ranks needs the events' users, positions and targets")
    order = np.lexsort((counts.positions, counts.users))
    columns = {
        "user": counts.users, "position": counts.positions, "item": counts.targets,
        "rank_pessimistic": counts.rank_pessimistic(), "rank_optimistic": counts.rank_optimistic(),
        "user_train_events": train_events(data)[counts.users],
    }
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values)[order]
        smallest = np.min_scalar_type(int(values.max()) if len(values) else 0)
        arrays[name] = pa.array(values.astype(smallest, copy=False))
    meta = {"format": RANKS_FORMAT, "n_items": int(data.n_items), "n_users": int(data.n_users),
            "rank_pessimistic": "1 + #items scoring higher + #other items scoring the same",
            "rank_optimistic": "1 + #items scoring higher", **(settings or {})}
    table = pa.table(arrays).replace_schema_metadata({"seqexp": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def write_id_maps(data: SequenceData, path: Path) -> Path | None:
    """The raw ids behind the user indices and item codes of a ranks file, once per run: one
    row per user and per item (kind "user" / "item", code, raw_id as a string). None when the
    data carries no raw ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data.user_ids is None or data.item_ids is None:
        return None
    kinds = np.repeat(np.array(["user", "item"]), [len(data.user_ids), len(data.item_ids)])
    codes = np.concatenate([np.arange(len(data.user_ids)), np.arange(len(data.item_ids))])
    table = pa.table({"kind": pa.array(kinds).dictionary_encode(), "code": codes,
                      "raw_id": np.concatenate([data.user_ids, data.item_ids]).astype(str)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path
