"""A trained model with its users' training histories and raw ids, rebuilt from a best
checkpoint: what `seqexp.load`, `seqexp-recommend` and the run's MLflow Model
(seqexp.run.mlflow_model) all recommend with.

The best checkpoint (checkpoints/best.pt) carries the resolved config, the raw user and item
ids and each user's training events beside the weights (seqexp.run.artifacts), and is read
with torch.load(weights_only=True): tensors and plain values only, never pickled code. Its model
is built from the config without Hydra's instantiate: one of seqexp's own model classes, plain
values only (seqexp.core.safe_config, docs/long-runs.md).

A prediction point goes through the models' own contract (prediction_states / score_items),
as one more event after the context: the evaluator's question, asked once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf

from seqexp.core.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from seqexp.core.errors import SeqexpError, message_line
from seqexp.core.safe_config import checkpoint_config, model_arguments
from seqexp.data.batching import PredictionBatch
from seqexp.data.sequences import SequenceData
from seqexp.engine.memory import ModelBuild, human, model_estimate, tensor_bytes
from seqexp.run.artifacts import raw_id_strings
from seqexp.run.options import check_model
from seqexp.run.registry import registry

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
        if bool(torch.isnan(scores).any()):
            raise SeqexpError(f"{self._model_name()} scores NaN: its checkpoint holds weights "
                              f"that are not finite (a diverged training?); use another run")
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


def from_checkpoint(local: Path, where: Path | str | None = None,
                    device: torch.device | str = "cpu") -> Recommendations:
    """The model of the best checkpoint file `local`, on `device`; errors name it `where`
    (default: the file itself).

    Nothing from the file is executed: the checkpoint is read with torch.load(weights_only=True)
    and its model is built only from seqexp's own model classes with plain values
    (seqexp.core.safe_config); a checkpoint that does not fit together is one SeqexpError
    naming it."""
    path = local if where is None else where
    try:
        payload = read_checkpoint(local)
    except SeqexpError as exc:
        raise SeqexpError(str(exc).replace(str(local), str(path))) from None
    if payload.get("format") != CHECKPOINT_FORMAT or "model" not in payload:
        raise SeqexpError(f"{path}: not a seqexp best checkpoint with its config and ids "
                          f"(written by an older seqexp?); rerun the experiment")
    config = checkpoint_config(payload.get("config"), path)
    models = registry()
    allowed = {name: models.model_class(name) for name in models.models}
    cls, arguments = model_arguments(config.model, allowed, path)
    try:
        check_model(OmegaConf.to_container(config.model, resolve=False))
    except SeqexpError as exc:
        raise SeqexpError(f"{path}: its {exc}; refused (seqexp loads only configs it wrote: "
                          f"use the checkpoint of a seqexp run)") from None
    data = _history(payload, path)
    weights = payload["model"]
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise SeqexpError(f"{path}: its model weights are not a mapping of names to tensors; "
                          f"the checkpoint is damaged, rerun the experiment")
    model = _sized_model(functools.partial(cls, **arguments), arguments, data, weights, path,
                         torch.device(device))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = (lines[1] if len(lines) > 1 else message_line(exc))[:200]
        raise SeqexpError(f"{path}: the weights do not fit the model its config describes "
                          f"({reason}); the checkpoint is inconsistent, rerun the experiment"
                          ) from None
    return Recommendations(model.to(device).eval(), data, config)


def _sized_model(build: ModelBuild, arguments: dict[str, Any], data: SequenceData,
                 weights: dict[str, torch.Tensor], path: Path | str,
                 device: torch.device) -> Recommender:
    """The model of a checkpoint's config, built once its tensors, estimated on the meta
    device (seqexp.engine.memory), fit the memory of `device` and have the shapes of the
    checkpoint's own weights: a tampered size is refused before anything is allocated."""
    sizes = {"n_items": data.n_items, "n_users": data.n_users}
    try:
        shapes, estimate = model_estimate(build, sizes, arguments, device)
    except SeqexpError as exc:
        raise SeqexpError(f"{path}: {exc}; the checkpoint's config does not build its model"
                          ) from None
    held = human(tensor_bytes(weights.values()))
    refused = estimate.refusal({f"model.{k}": v for k, v in arguments.items()}, "its model",
                               f"refused before anything is built (its weights hold {held}): "
                               f"use the checkpoint of a seqexp run")
    if refused is not None or shapes is None:  # None: beyond what torch can address
        raise SeqexpError(f"{path}: {refused or 'its config makes a model too large to build'}")
    for name, tensor in shapes.state_dict().items():
        if name in weights and weights[name].shape != tensor.shape:
            raise SeqexpError(
                f"{path}: the weights do not fit the model its config describes (size mismatch "
                f"for {name}: the checkpoint holds {list(weights[name].shape)}, the config "
                f"makes {list(tensor.shape)}); the checkpoint is inconsistent, rerun the "
                f"experiment")
    return build(**sizes)


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


