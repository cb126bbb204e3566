"""Recommendations from a finished (or stopped) run, without the original data.

The best checkpoint (checkpoints/best.pt) carries the resolved config, the raw user and item
ids and each user's training events beside the weights (seqexp.run.artifacts), and is read
with torch.load(weights_only=True): tensors and plain values only, never pickled code. Its model
is built from the config without Hydra's instantiate: one of seqexp's own model classes, plain
values only (seqexp.core.safe_config, docs/long-runs.md).

    model = seqexp.load("<run id or checkpoint path>")
    model.recommend(user="42", k=20)            # after the user's last training event
    model.recommend(items=["a", "b"], k=20)      # after this sequence of items

A prediction point goes through the models' own contract (prediction_states / score_items),
as one more event after the context: the evaluator's question, asked once.

`seqexp-recommend RUN --user U [--k 20]` or `--items a,b,c` prints the ranked table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from seqexp.core.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from seqexp.core.errors import SeqexpError, message_line
from seqexp.core.resources import config_dir
from seqexp.core.safe_config import checkpoint_config, model_arguments, model_targets
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.run.artifacts import raw_id_strings
from seqexp.run.resume import OUTPUTS_TAG
from seqexp.run.tracking import Tracker, default_tracking_uri, sqlite_path, with_lock_retry

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

    from seqexp.models.base import Recommender

# The prediction point comes this long after the context's last event (a later session: for
# DREAM a new basket, whatever the basket gap).
NEXT_EVENT_AFTER_S = 2**31


def _code(index: dict[str, int], ids: list[str], raw: str | int, what: str, where: str) -> int:
    """The code of a raw user or item id, or one line saying it is unknown."""
    try:
        return index[str(raw)]
    except KeyError:
        raise SeqexpError(f"{what} {raw!r} is not {where} ({len(ids)} {what}s, "
                          f"e.g. {ids[0]!r})") from None


class Recommendations:
    """A trained model with its users' training histories and raw ids: `recommend`."""

    def __init__(self, model: Recommender, data: SequenceData,
                 config: DictConfig | None = None) -> None:
        self.model = model
        self.data = data
        self.config = config
        self.user_ids = raw_id_strings(data.user_ids, data.n_users)
        self.item_ids = raw_id_strings(data.item_ids, data.n_items)
        self._user_index = {u: i for i, u in enumerate(self.user_ids)}
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}

    def recommend(self, user: str | int | None = None, items: Sequence[str | int] | None = None,
                  k: int = 20, exclude_seen: bool = False,
                  timestamps: Sequence[int] | None = None) -> pd.DataFrame:
        """The top k items (raw ids) with their scores, as a DataFrame (rank, item, score).

        `user` alone: after the user's last training event. `items`: after this sequence
        (raw item ids, oldest first; `timestamps` in seconds, default one second apart), for
        `user` if given; a model that scores with a user vector needs one. `exclude_seen`
        leaves out the context's items."""
        import pandas as pd

        if k < 1:
            raise SeqexpError(f"k={k} must be a positive integer")
        if user is None and items is None:
            raise SeqexpError("recommend needs user=..., items=[...] or both")
        user_index = 0 if user is None else self._user(user)
        if items is None:
            start, stop = self.data.offsets[user_index], self.data.train_end[user_index]
            context = self.data.items[start:stop].astype(np.int64)
            times = self.data.timestamps[start:stop].astype(np.int64)
            if len(context) == 0:
                raise SeqexpError(f"user {user} has no training events to recommend from; "
                                  f"pass items=[...]")
        else:
            if user is None and self.model.uses_users:
                raise SeqexpError(f"{self._model_name()} scores with a user vector: pass a "
                                  f"known user (--user) with the items")
            context = np.array([self._item(i) for i in items], dtype=np.int64)
            if len(context) == 0:
                raise SeqexpError("items=[...] is empty; give at least one item")
            times = (np.arange(len(context), dtype=np.int64) if timestamps is None
                     else np.asarray(timestamps, dtype=np.int64))
            if len(times) != len(context):
                raise SeqexpError(f"{len(times)} timestamps for {len(context)} items")
        scores = self._scores(user_index, context, times)
        if exclude_seen:
            scores[torch.from_numpy(np.unique(context))] = -torch.inf
        top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
        return pd.DataFrame({
            "rank": np.arange(1, len(top.indices) + 1),
            "item": [self.item_ids[i] for i in top.indices.tolist()],
            "score": top.values.numpy().astype(np.float64),
        })

    def _scores(self, user: int, context: np.ndarray, times: np.ndarray) -> torch.Tensor:
        """Scores of every item for the point after `context`: one prediction point, in a row
        that holds the context and a placeholder target one column later."""
        length = len(context)
        items = np.append(context, 0)[None]
        stamps = np.append(times, times[-1] + NEXT_EVENT_AFTER_S)[None]
        device = self.model.device
        batch = PredictionBatch(
            users=torch.tensor([user]), items=torch.from_numpy(items),
            timestamps=torch.from_numpy(stamps), lengths=torch.tensor([length + 1]),
            target_rows=torch.tensor([0]), target_cols=torch.tensor([length]),
            targets=torch.tensor([0]),
        ).to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                state = self.model.prediction_states(batch)
                scores = self.model.score_items(state, 0, self.model.n_items)
        finally:
            self.model.train(was_training)
        return scores[0].float().cpu()

    def _user(self, user: str | int) -> int:
        return _code(self._user_index, self.user_ids, user, "user",
                     "a user of this run's training data")

    def _item(self, item: str | int) -> int:
        return _code(self._item_index, self.item_ids, item, "item",
                     "in this run's training vocabulary")

    def _model_name(self) -> str:
        name = None if self.config is None else self.config.get("model", {}).get("name")
        return f"model={name}" if name else type(self.model).__name__


def checkpoint_path(source: str | Path, tracking_uri: str | None = None,
                    download_dir: Path | None = None) -> Path:
    """The best checkpoint of `source`: a checkpoint file, a run's outputs folder, or an MLflow
    run id (its outputs folder when it is on this machine, else its logged artifact, downloaded
    into `download_dir`: the caller removes it; default a new seqexp-* temporary folder)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise SeqexpError(f"{path}: no checkpoints/best.pt in this folder")

    uri = tracking_uri or default_tracking_uri(Path.cwd())
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise SeqexpError(f"{source}: neither a checkpoint file, a run folder nor a run id "
                          f"(there is no MLflow store {database}; pass --tracking-uri)")
    tracker = Tracker(uri, None)
    try:
        run = with_lock_retry(tracker.client.get_run, str(source))
    except Exception:  # noqa: BLE001 - MLflow's "not found" differs between stores
        raise SeqexpError(f"{source}: neither a checkpoint file, a run folder nor a run id in "
                          f"{uri} (pass --tracking-uri for another store)") from None
    folder = run.data.tags.get(OUTPUTS_TAG)
    if folder and (Path(folder) / "checkpoints" / "best.pt").is_file():
        return Path(folder) / "checkpoints" / "best.pt"
    try:
        local = with_lock_retry(tracker.client.download_artifacts, run.info.run_id,
                                "checkpoints/best.pt",
                                str(download_dir or tempfile.mkdtemp(prefix="seqexp-")))
    except Exception:  # noqa: BLE001 - no such artifact
        raise SeqexpError(f"run {source} has no best checkpoint here or in its artifacts "
                          f"(mlflow.log_checkpoint=false?)") from None
    return Path(local)


def load(source: str | Path, tracking_uri: str | None = None,
         device: str = "cpu") -> Recommendations:
    """The model of a run (id, outputs folder or checkpoint file), ready to recommend.

    Nothing from the file is executed: the checkpoint is read with torch.load(weights_only=True)
    and its model is built only from seqexp's own model classes with plain values
    (seqexp.core.safe_config); a checkpoint that does not fit together is one SeqexpError naming it.
    A checkpoint downloaded from MLflow goes to a temporary folder, removed before returning."""

    where_to = _device(device)
    with tempfile.TemporaryDirectory(prefix="seqexp-") as scratch:
        local = checkpoint_path(source, tracking_uri, Path(scratch))
        # A downloaded checkpoint is named by its run: its temporary folder will be gone.
        path: Path | str = (f"run {source}'s artifact checkpoints/best.pt"
                            if local.is_relative_to(scratch) else local)
        try:
            payload = read_checkpoint(local)
        except SeqexpError as exc:
            raise SeqexpError(str(exc).replace(str(local), str(path))) from None
    if payload.get("format") != CHECKPOINT_FORMAT or "model" not in payload:
        raise SeqexpError(f"{path}: not a seqexp best checkpoint with its config and ids "
                          f"(written by an older seqexp?); rerun the experiment")
    config = checkpoint_config(payload.get("config"), path)
    cls, arguments = model_arguments(config.model, model_targets(config_dir()), path)
    data = _history(payload, path)
    try:
        model = cls(n_items=data.n_items, n_users=data.n_users, **arguments)
    except SeqexpError as exc:
        raise SeqexpError(f"{path}: {exc}; the checkpoint's config does not build its model"
                          ) from None
    weights = payload["model"]
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise SeqexpError(f"{path}: its model weights are not a mapping of names to tensors; "
                          f"the checkpoint is damaged, rerun the experiment")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = (lines[1] if len(lines) > 1 else message_line(exc))[:200]
        raise SeqexpError(f"{path}: the weights do not fit the model its config describes "
                          f"({reason}); the checkpoint is inconsistent, rerun the experiment"
                          ) from None
    return Recommendations(model.to(where_to).eval(), data, config)


_HISTORY = ("user_ids", "item_ids", "train_offsets", "train_items", "train_timestamps")


def _history(payload: dict[str, Any], path: Path | str) -> SequenceData:
    """The checkpoint's raw ids and training events, checked to fit together."""
    missing = [key for key in _HISTORY if key not in payload]
    if missing:
        raise SeqexpError(f"{path}: the checkpoint has no {missing[0]}; it is damaged or not a "
                          f"seqexp best checkpoint, rerun the experiment")
    for key in ("user_ids", "item_ids"):
        ids = payload[key]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise SeqexpError(f"{path}: {key} is not a non-empty list of ids; the checkpoint is "
                              f"damaged, rerun the experiment")
    arrays = {}
    for key in ("train_offsets", "train_items", "train_timestamps"):
        value = payload[key]
        if (not isinstance(value, torch.Tensor) or value.ndim != 1
                or value.dtype.is_floating_point or value.dtype.is_complex):
            raise SeqexpError(f"{path}: {key} is not a 1-d integer tensor; the checkpoint is "
                              f"damaged, rerun the experiment")
        arrays[key] = value.numpy().astype(np.int64)
    offsets, items = arrays["train_offsets"], arrays["train_items"]
    n_users, n_items = len(payload["user_ids"]), len(payload["item_ids"])
    problem = None
    if len(offsets) != n_users + 1:
        problem = f"{len(offsets) - 1} users' offsets for {n_users} user_ids"
    elif offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(items):
        problem = f"train_offsets do not cut the {len(items)} train_items into users"
    elif len(arrays["train_timestamps"]) != len(items):
        problem = f"{len(arrays['train_timestamps'])} train_timestamps for {len(items)} items"
    elif len(items) and (items.min() < 0 or items.max() >= n_items):
        problem = f"train_items holds item codes up to {items.max()} for {n_items} item_ids"
    if problem is not None:
        raise SeqexpError(f"{path}: {problem}; the checkpoint is inconsistent, rerun the "
                          f"experiment")
    return SequenceData(
        items=items.astype(np.int32), timestamps=arrays["train_timestamps"],
        offsets=offsets, train_end=offsets[1:].copy(), val_end=offsets[1:].copy(),
        n_items=n_items, user_ids=np.array(payload["user_ids"], dtype=str),
        item_ids=np.array(payload["item_ids"], dtype=str),
    )


def _device(name: str) -> torch.device:
    """The device to load onto, or one line saying it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SeqexpError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SeqexpError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SeqexpError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s); use cuda:0 or cpu")
    elif device.type != "cpu":
        raise SeqexpError(f"--device {name!r}: seqexp-recommend runs on cpu or cuda; use one "
                          f"of those")
    return device


def main(argv: Sequence[str] | None = None) -> None:
    """seqexp-recommend RUN (--user U | --items a,b,c) [--k 20] [--exclude-seen]"""
    parser = argparse.ArgumentParser(
        prog="seqexp-recommend",
        description="Top-k items of a seqexp run's model for a user or an item sequence.")
    parser.add_argument("run", help="MLflow run id, run outputs folder or checkpoint file")
    parser.add_argument("--user", help="raw user id: after the user's training events")
    parser.add_argument("--items", help="raw item ids, comma-separated, oldest first")
    parser.add_argument("--k", type=int, default=20, help="how many items (default 20)")
    parser.add_argument("--exclude-seen", action="store_true",
                        help="leave out the items of the context")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the run (default: sqlite mlflow.db here)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    # MLflow's download bar would come before the one line of an error.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if args.user is None and args.items is None:
            raise SeqexpError("pass --user U, --items a,b,c or both")
        items = None if args.items is None else [i for i in args.items.split(",") if i]
        model = load(args.run, args.tracking_uri, args.device)
        table = model.recommend(user=args.user, items=items, k=args.k,
                                exclude_seen=args.exclude_seen)
    except SeqexpError as exc:
        print(f"seqexp-recommend: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))


if __name__ == "__main__":
    main()
