"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's last `max_len` items,
scored against every item through the shared item embedding (docs/models.md)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqexp.core.schema import Key, integer, number
from seqexp.data.batching import PredictionBatch, to_device
from seqexp.data.sequences import SequenceData
from seqexp.models.base import Recommender


@dataclass
class SequenceRows:
    """Training rows: `inputs[r, c]` is followed by `targets[r, c]`; rows are left-padded with
    the padding item `n_items` where `mask` is false."""

    inputs: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L] bool
    n_events: int


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool, true where query position q may attend to key position k: k <= q (no
    later item) and k holds an item, and always k == q (a padding query attends to itself only,
    so no row of the softmax is empty). `valid` [B, L]: true where a position holds an item."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, :]) | itself


class SelfAttentionBlock(nn.Module):
    """x + Dropout(SA(LN(x))), then + Dropout(FFN(LN(.))): the paper's residual blocks with
    layer normalisation before each sublayer and a point-wise two-layer ReLU feed-forward."""

    def __init__(self, size: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_attention = nn.LayerNorm(size)
        self.query = nn.Linear(size, size)
        self.key = nn.Linear(size, size)
        self.value = nn.Linear(size, size)
        self.norm_ffn = nn.LayerNorm(size)
        self.ffn = nn.Sequential(nn.Linear(size, size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(size, size))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, size = x.shape
        return x.view(batch, length, self.n_heads, size // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        y = self.norm_attention(x)
        attended = F.scaled_dot_product_attention(
            self._heads(self.query(y)), self._heads(self.key(y)), self._heads(self.value(y)),
            attn_mask=allowed[:, None], dropout_p=self.dropout.p if self.training else 0.0)
        x = x + self.dropout(attended.transpose(1, 2).reshape(x.shape))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


def heads_divide_size(model: Mapping[str, Any]) -> str | None:
    """The heads split the hidden vector into equal parts."""
    heads, size = model.get("n_heads"), model.get("hidden_size")
    if heads is not None and size is not None and size % heads:
        return f"model.n_heads={heads} must divide model.hidden_size={size}"
    return None


class SASRec(Recommender):
    """The output at a position is a function of the items at that position and before it only
    (causal attention); a prediction point's state is the output at its last context item, over
    a window of the last `max_len` context items, and item i scores state · e_i with e_i the
    item's own input embedding."""

    config_keys = {
        "hidden_size": Key(integer(1), "size of the item, position and hidden vectors"),
        "max_len": Key(integer(1), "latest items a prediction attends to"),
        "n_blocks": Key(integer(1), "self-attention blocks"),
        "n_heads": Key(integer(1), "attention heads (must divide hidden_size)"),
        "dropout": Key(number(0.0, 1.0, high_open=True), "dropout of embeddings, attention "
                       "and feed-forward outputs"),
        "eval_points": Key(integer(1), "prediction points encoded at once at evaluation "
                           "(memory)", affects_results=False),
    }
    config_checks = (heads_divide_size,)

    def __init__(self, n_items: int, n_users: int, *, hidden_size: int, max_len: int,
                 n_blocks: int, n_heads: int, dropout: float, eval_points: int) -> None:
        super().__init__(n_items, n_users)
        self.max_len = max_len
        self.eval_points = eval_points
        self.hidden_size = hidden_size
        # row n_items is the padding item: zero and never trained
        self.item_embedding = nn.Embedding(n_items + 1, hidden_size, padding_idx=n_items)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(hidden_size, n_heads, dropout)
                                    for _ in range(n_blocks))
        self.final_norm = nn.LayerNorm(hidden_size)
        # N(0, 1/d) instead of nn.Embedding's N(0, 1): a normalised output (length about sqrt(d))
        # times an item vector of length about 1 starts the logits near unit scale
        for table in (self.item_embedding, self.position_embedding):
            nn.init.normal_(table.weight, std=hidden_size ** -0.5)
        with torch.no_grad():
            self.item_embedding.weight[n_items].zero_()

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Outputs [B, L, d] for left-padded item windows [B, L] (padding = n_items)."""
        valid = items != self.n_items
        positions = torch.arange(items.shape[1], device=items.device)
        x = self.dropout(self.item_embedding(items) + self.position_embedding(positions))
        # no item attends to a padding position, so what the padding positions hold never
        # reaches an item's output
        allowed = attention_mask(valid)
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)

    def step_elements(self, batch_size: int, n_events: int) -> dict[str, tuple[int, str]]:
        """Rows of `max_len` positions (at most one per user and `max_len` events): each block's
        vectors (about 12 hidden-sized ones a position, kept for the backward pass) and
        attention weights; the logits of every position against the whole catalogue, with
        their softmax and gradient."""
        rows = min(batch_size, self.n_users + n_events // self.max_len)
        positions = rows * self.max_len
        heads = max((block.n_heads for block in self.blocks), default=0)
        per_block = 12 * positions * self.hidden_size + 3 * rows * heads * self.max_len**2
        return {"activations": (len(self.blocks) * per_block, "train.batch_size"),
                "logits": (3 * positions * self.n_items, "train.batch_size")}

    def training_batches(self, train: SequenceData, batch_size: int,
                         rng: np.random.Generator) -> Iterator[SequenceRows]:
        """Each user's training (input, next item) pairs cut into rows of `max_len` from the
        end, the earliest row left-padded; rows in a random order."""
        inputs, targets, mask = _training_rows(train, self.max_len)
        order = rng.permutation(len(inputs))
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            part = mask[rows]
            yield SequenceRows(torch.from_numpy(np.where(part, inputs[rows], self.n_items)),
                               torch.from_numpy(targets[rows]), torch.from_numpy(part),
                               int(part.sum()))

    def training_loss(self, batch: SequenceRows) -> torch.Tensor:
        """Cross-entropy of every next item against the whole catalogue."""
        device = self.device
        mask = to_device(batch.mask, device)
        hidden = self.encode(to_device(batch.inputs, device))[mask]
        logits = hidden @ self.item_embedding.weight[:self.n_items].T
        return F.cross_entropy(logits, to_device(batch.targets, device)[mask])

    def prediction_states(self, batch: PredictionBatch) -> torch.Tensor:
        """The output at the last of each target's `max_len` latest context items, computed
        `eval_points` prediction points at a time (each point has its own window)."""
        steps = torch.arange(self.max_len, device=batch.items.device)
        states = []
        for lo in range(0, batch.n_targets, self.eval_points):
            rows = batch.target_rows[lo:lo + self.eval_points, None]
            positions = batch.target_cols[lo:lo + self.eval_points, None] - self.max_len + steps
            window = batch.items[rows, positions.clamp(min=0)]
            window = torch.where(positions >= 0, window, self.n_items)
            states.append(self.encode(window)[:, -1])
        if not states:
            return torch.empty(0, self.hidden_size, device=batch.items.device)
        return torch.cat(states)

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.item_embedding.weight[lo:hi].T

    def score_factors(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return state, self.item_embedding.weight[:self.n_items], None  # not the padding row


def _training_rows(train: SequenceData, length: int) -> tuple[np.ndarray, ...]:
    """(inputs, targets, mask), each [rows, length]: row k of a user (k = 0 its last) holds the
    pairs whose target is one of the user's training events train_end - 1 - k·length - j,
    j < length, right-aligned, so a row's last column is its latest pair."""
    starts = train.offsets[:-1]
    n_pairs = np.clip(train.train_end - starts - 1, 0, None)
    n_rows = -(-n_pairs // length)
    row_user = np.repeat(np.arange(train.n_users), n_rows)
    first_row = np.cumsum(n_rows) - n_rows
    row_k = np.arange(len(row_user)) - first_row[row_user]
    last_target = train.train_end[row_user] - 1 - row_k * length
    target = last_target[:, None] - (length - 1) + np.arange(length)
    mask = target > starts[row_user][:, None]  # a pair needs an earlier training event
    safe = np.where(mask, target, 1)
    inputs = np.where(mask, train.items[safe - 1], 0).astype(np.int64)
    targets = np.where(mask, train.items[safe], 0).astype(np.int64)
    return inputs, targets, mask
