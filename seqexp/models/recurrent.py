"""The recurrent sequence model shared by every GRU variant: item (and user) embeddings, a
pluggable cell, and a softmax over all items, trained with truncated BPTT over windows."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqexp.core.schema import MODEL_KEYS, Key, ModelCheck, choice, flag, integer, listed, number
from seqexp.data.batching import (
    LaneStates,
    PredictionBatch,
    WindowBatch,
    session_breaks,
    to_device,
    window_batches,
)
from seqexp.data.sequences import SequenceData
from seqexp.models import cpu_kernels
from seqexp.models.base import Recommender
from seqexp.models.blocked_softmax import FullSoftmaxCE
from seqexp.models.cells import CELLS
from seqexp.models.cpu_kernels import Dropout, ItemInputs


def cell_options(cell: type[nn.Module]) -> list[str]:
    """The keyword arguments of a cell's constructor besides hidden_size: its model.* keys."""
    return list(inspect.signature(cell).parameters)[1:]


def check_cell_options(cells: Mapping[str, type[nn.Module]], keys: Mapping[str, Key],
                       fixed_cell: str | None = None) -> ModelCheck:
    """The check that each key of a model block that is no key of the model's own (`keys`,
    its class's config_keys, less the cells' options) is an option of its cell (model.cell's
    among `cells`, or `fixed_cell`)."""
    any_cells = {option for cell in cells.values() for option in cell_options(cell)}
    own = set(keys) - any_cells

    def check(model: Mapping[str, Any]) -> str | None:
        cell = fixed_cell or model.get("cell")
        if cell not in cells:  # model.cell's own rule names the cells
            return None
        accepted = cell_options(cells[cell])
        unknown = [key for key in model
                   if key not in own and key not in MODEL_KEYS and key not in accepted]
        if unknown:
            return (f"model.{unknown[0]} is not an option of model.cell={cell} (its options: "
                    f"{', '.join(accepted) or 'none'})")
        return None
    return check


def check_session_cell(model: Mapping[str, Any]) -> str | None:
    """Session-scoped states restart inside a window: the cell must take a carry mask."""
    cell = model.get("cell")
    if (model.get("session_gap_s") is not None and cell in CELLS
            and not CELLS[cell].takes_carry_mask):
        return (f"model.session_gap_s needs a cell that can restart its state inside a window; "
                f"model.cell={cell} cannot (use model.cell=gru)")
    return None


class RecurrentRecommender(Recommender):
    """o^t = T h^t over all items, h^t from the cell. Hidden state is carried across a user's
    windows (detached at window borders) and reset between users; evaluation replays each
    user's whole history, so the state at a prediction point is warm from the training events.

    `session_gap_s` scopes the state to sessions instead: a gap above it between two events of
    a user ends a session, and the state restarts from h0 = 0 after the session's last event,
    in training and in evaluation alike, so the first event of a session is predicted from h0
    and later ones from that session's events only. The user vector v of the user-based cells
    is the same in every session: it is then the only memory across sessions.

    A cell may carry a state larger than its output (`state_size`, HRNN's two states).
    """

    config_keys = {
        "hidden_size": Key(integer(1), "hidden units of the recurrent layer"),
        "window": Key(integer(1), "truncated-BPTT unfold: events per training window"),
        "dropout": Key(number(0.0, 1.0), "dropout of the recurrent output"),
        "dropout_is_keep_prob": Key(flag(), "read dropout as a keep probability (0.8 drops "
                                    "0.2)"),
        "user_dropout": Key(number(0.0, 1.0), "dropout of the user vector (user-based cells)"),
        "loss": Key(choice("full_softmax", "sampled_softmax"), "training loss"),
        "n_negatives": Key(integer(1), "shared negatives of the sampled softmax"),
        "sample_alpha": Key(number(0.0), "negatives sampled by popularity^sample_alpha"),
        # changes results by float rounding only (sums taken in another order), so it counts
        "softmax_block": Key(integer(1), "largest block of full-softmax logits (rows x items) "
                             "computed at once; more are computed in blocks (memory; another "
                             "value changes float rounding only)"),
        "eval_chunk": Key(integer(1), "time steps replayed per chunk at evaluation (memory)",
                          affects_results=False),
        "session_gap_s": Key(number(0.0, nullable=True), "a gap above this many seconds ends a "
                             "session and the state restarts from h0, in training and "
                             "evaluation (null = one state over the user's whole history)"),
        "cell": Key(listed("cells"), "the recurrent cell"),
        # rectified_ugru's cell
        "threshold": Key(choice("soft", "hard"), "rectified_ugru: sigmoid-relaxed or step "
                         "thresholds"),
        "temperature": Key(number(0.0, low_open=True), "rectified_ugru: temperature of the "
                           "soft thresholds"),
        "omega": Key(number(0.0, 1.0, nullable=True), "rectified_ugru: fixed omega (null = "
                     "learned)"),
    }
    cell_types = CELLS  # the cells model.cell names
    config_checks = (check_cell_options(CELLS, config_keys), check_session_cell)

    def __init__(
        self,
        n_items: int,
        n_users: int,
        *,
        cell: str,
        hidden_size: int,
        window: int,
        dropout: float,
        dropout_is_keep_prob: bool,
        user_dropout: float,
        loss: str,
        n_negatives: int,
        sample_alpha: float,
        softmax_block: int,
        eval_chunk: int,
        session_gap_s: float | None,
        **cell_options,
    ) -> None:
        super().__init__(n_items, n_users)
        self.hidden_size = hidden_size
        self.window = window
        self.eval_chunk = eval_chunk
        self.loss_name = loss
        # Table 1's "dropout 0.8" comes from TF-era code, where it is a keep probability.
        self.drop_p = 1.0 - dropout if dropout_is_keep_prob else dropout
        self.n_negatives = n_negatives
        self.sample_alpha = sample_alpha
        self.softmax_block = softmax_block
        self.embedding = nn.Embedding(n_items, hidden_size)
        self.cell = self.cell_types[cell](hidden_size, **cell_options)
        self.state_size = getattr(self.cell, "state_size", hidden_size)
        self.session_gap_s = session_gap_s
        self.user_embedding = nn.Embedding(n_users, hidden_size) if self.cell.uses_user else None
        self.dropout = Dropout(self.drop_p)
        # v is constant along a user's sequence; its dropout mask is drawn per window
        self.user_dropout = Dropout(user_dropout)
        self.output = nn.Linear(hidden_size, n_items)
        # log of the expected count of each item among the shared negatives (logQ correction)
        self.register_buffer("negative_log_q", torch.zeros(n_items))
        self.register_buffer("negative_probs", torch.full((n_items,), 1.0 / n_items))

    def fit(self, train: SequenceData,
            stop_requested: Callable[[], str | None] = lambda: None) -> None:
        """The popularity distribution of the sampled-softmax negatives (training events)."""
        weights = torch.from_numpy(train.item_popularity()).double().clamp_min(1.0)
        probs = weights**self.sample_alpha
        probs /= probs.sum()
        self.negative_probs.copy_(probs.float())
        self.negative_log_q.copy_(torch.log(probs * self.n_negatives).float())

    @property
    def uses_users(self) -> bool:
        return self.user_embedding is not None

    def training_state(self, batch: WindowBatch | None = None) -> dict[str, torch.Tensor]:
        if batch is None or batch.carry is None:
            return {}
        return {"carry": batch.carry.states.clone()}

    def load_training_state(self, state: dict[str, torch.Tensor],
                            batch: WindowBatch | None = None) -> None:
        if batch is not None and batch.carry is not None and "carry" in state:
            batch.carry.states.copy_(state["carry"])

    def _user_vectors(self, users: torch.Tensor) -> torch.Tensor | None:
        if self.user_embedding is None:
            return None
        return self.user_dropout(self.user_embedding(users))

    def step_elements(self, batch_size: int, n_events: int) -> dict[str, tuple[int, str]]:
        """The carried states of `batch_size` lanes; a window of events per lane (at most one
        lane per user) with the cell's gates, inputs and dropout masks (about 8 state-sized
        vectors an event, kept for the backward pass); and the output logits with their
        gradient and softmax: the full softmax's in blocks of `model.softmax_block`, the
        sampled softmax's over its shared negatives."""
        rows = min(batch_size, self.n_users) * self.window
        parts = {"carried states": (batch_size * self.state_size, "train.batch_size"),
                 "activations": (8 * rows * self.state_size, "train.batch_size")}
        if self.loss_name == "sampled_softmax":
            parts["logits"] = (3 * rows * self.n_negatives, "train.batch_size")
        elif rows * self.n_items > self.softmax_block:
            parts["logits"] = (3 * self.softmax_block, "model.softmax_block")
        else:
            parts["logits"] = (3 * rows * self.n_items, "train.batch_size")
        return parts

    def training_batches(
        self, train: SequenceData, batch_size: int, rng: np.random.Generator
    ) -> Iterator[WindowBatch]:
        carry = LaneStates(torch.zeros(batch_size, self.state_size, device=self.device))
        yield from window_batches(train, batch_size, self.window, rng, self.session_gap_s, carry)

    def training_loss(self, batch: WindowBatch) -> torch.Tensor:
        device = self.device
        lanes = to_device(torch.from_numpy(batch.lanes), device)
        keep = to_device(~batch.reset, device).unsqueeze(1)
        if batch.carry is None:
            h0 = torch.zeros(len(batch.lanes), self.state_size, device=device)
        else:
            h0 = batch.carry.entering(lanes, keep)
        x = self.dropout(self.embedding(to_device(batch.inputs, device)))
        carry_mask = None
        if batch.session_break is not None:
            carry_mask = to_device(~batch.session_break, device).to(x.dtype)
        out, h = self.cell(x, h0, self._user_vectors(to_device(batch.users, device)),
                           carry_mask)
        if batch.carry is not None:
            batch.carry.leave(lanes, h)
        # Only the existing (input, next) pairs, gathered by positions computed on the CPU.
        pairs = to_device(batch.pairs, device)
        hidden = self.dropout(out.reshape(-1, self.hidden_size).index_select(0, pairs))
        targets = to_device(batch.targets.reshape(-1)[batch.pairs], device)
        if self.loss_name == "full_softmax":
            return self.full_softmax_loss(hidden, targets)
        return self.sampled_softmax_loss(hidden, targets)

    def full_softmax_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over every item. Logits that fit in one block (rows × items ≤
        softmax_block) are one product and F.cross_entropy; larger ones go through
        FullSoftmaxCE, a block at a time, so that the rows × items matrix never exists."""
        if len(hidden) * self.n_items <= self.softmax_block:
            return F.cross_entropy(self.output(hidden), targets)
        matmul_dtype = autocast_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            return FullSoftmaxCE.apply(hidden.float(), self.output.weight, self.output.bias,
                                       targets, self.softmax_block, matmul_dtype)

    def sampled_softmax_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target against `n_negatives` popularity-sampled items shared by
        the whole batch, with logQ correction (every logit minus log of the item's expected
        count among the negatives) and accidental hits (a negative equal to the target)
        masked out."""
        negatives = torch.multinomial(self.negative_probs, self.n_negatives, replacement=True)
        weight, bias = self.output.weight, self.output.bias
        # index_select, not [ ]: its backward is an index_add, faster on a CPU
        # than the accumulating index_put of advanced indexing
        positive = ((hidden * weight.index_select(0, targets)).sum(-1)
                    + bias.index_select(0, targets))
        positive = positive - self.negative_log_q[targets]
        log_count = 0.0
        if cpu_kernels.active("sparse_negatives", hidden.device):
            # c copies of a negative share one logit l, and c·e^l = e^(l + log c): one column
            # each, the same loss and gradients.
            negatives, counts = torch.unique(negatives, return_counts=True)
            log_count = counts.to(bias.dtype).log()
        negative_bias = (bias.index_select(0, negatives) - self.negative_log_q[negatives]
                         + log_count)
        # Under autocast only the products run in its dtype: the softmax sums thousands of
        # terms, so it stays in float32.
        matmul_dtype = autocast_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            return SampledSoftmaxCE.apply(hidden.float(),
                                          weight.index_select(0, negatives).float(),
                                          negative_bias.float(), positive.float(), targets,
                                          negatives, matmul_dtype)

    def prediction_states(self, batch: PredictionBatch) -> torch.Tensor:
        """Hidden state after each target's context, replaying the batch's sequences in time
        chunks; rows are sorted by length, so each chunk runs only the rows still going."""
        items, lengths = batch.items, batch.lengths
        n_rows, width = items.shape
        rows_all = torch.arange(n_rows, device=items.device)
        users = self._user_vectors(batch.users)
        states = torch.empty(batch.n_targets, self.hidden_size, device=items.device)
        context_end = batch.target_cols - 1  # state after this column predicts the target
        h = torch.zeros(n_rows, self.state_size, device=items.device)
        # a row runs to the end of the chunk it ends in: with the replay_steps kernel the rows
        # still running are re-selected every few steps (less padding, more chunks)
        step = (min(self.eval_chunk, cpu_kernels.REPLAY_STEPS)
                if cpu_kernels.active("replay_steps", items.device) else self.eval_chunk)
        fold = (cpu_kernels.active("item_inputs", items.device) and not self.training
                and int(lengths.sum()) > self.n_items)
        tables: dict = {}
        carry_mask = None
        if self.session_gap_s is not None:
            stamps = batch.timestamps
            carry_mask = torch.ones(n_rows, width, device=items.device)
            carry_mask[:, :-1] = (~session_breaks(stamps[:, :-1], stamps[:, 1:],
                                                  self.session_gap_s)).float()
        for lo in range(0, width, step):
            hi = min(lo + step, width)
            running = rows_all[lengths > lo]
            if len(running) == 0:
                break
            chunk = items[running, lo:hi]
            x = (ItemInputs(chunk, self.embedding.weight, tables) if fold
                 else self.embedding(chunk))
            user = None if users is None else users[running]
            mask = None if carry_mask is None else carry_mask[running, lo:hi]
            out, h_last = self.cell(x, h[running], user, mask)
            h[running] = h_last
            wanted = (context_end >= lo) & (context_end < hi)
            if wanted.any():
                # position of each wanted target's row among the running rows
                slot = torch.full((n_rows,), -1, dtype=torch.long, device=items.device)
                slot[running] = torch.arange(len(running), device=items.device)
                states[wanted] = out[slot[batch.target_rows[wanted]], context_end[wanted] - lo]
        return states

    def score_items(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return F.linear(state, self.output.weight[lo:hi], self.output.bias[lo:hi])

    def score_factors(self, state: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return state, self.output.weight, self.output.bias


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region active on `device_type`, or None outside one."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def accidental_hits(targets: torch.Tensor, negatives: torch.Tensor, rows_per_block: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block of `rows_per_block` rows, the (row within the block, negative slot) pairs
    whose negative equals the row's target: a sort and two binary searches instead of
    comparing every row with every negative."""
    order = torch.argsort(negatives)
    ordered = negatives[order]
    first = torch.searchsorted(ordered, targets)
    counts = torch.searchsorted(ordered, targets, right=True) - first
    rows = torch.repeat_interleave(counts)  # row p, counts[p] times
    within = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    slots = order[first[rows] + within]
    starts = range(0, len(targets), rows_per_block)
    edges = torch.searchsorted(
        rows, torch.arange(0, len(targets) + rows_per_block, rows_per_block,
                           device=rows.device)).tolist()
    return [(rows[a:b] - lo, slots[a:b])
            for lo, a, b in zip(starts, edges[:-1], edges[1:], strict=True)]


class SampledSoftmaxCE(torch.autograd.Function):
    """mean_p [log(e^{s_p} + sum_j e^{h_p·w_j + b_j}) − s_p], with s_p the positive logit and
    the negatives j equal to p's target left out, computed in row blocks of at most
    BLOCK_ELEMENTS logits: each block's softmax gives its gradients at once (probabilities −
    one-hot), so a [P, K] logit matrix larger than a block never exists as a whole and backward
    only scales.

    `matmul_dtype` bfloat16 (under train.amp) runs the three products in bfloat16; the logits,
    the softmax and the gradient sums over blocks stay in the input's dtype.
    """

    BLOCK_ELEMENTS = 1 << 27  # rows x negatives per block

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, neg_weight: torch.Tensor, neg_bias: torch.Tensor,
                positive: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        n_rows, n_neg = len(hidden), len(negatives)
        rows = max(1, SampledSoftmaxCE.BLOCK_ELEMENTS // n_neg)
        sparse = cpu_kernels.active("sparse_negatives", hidden.device)
        hits = accidental_hits(targets, negatives, rows) if sparse else None
        mm_dtype = matmul_dtype or hidden.dtype
        fused = mm_dtype == hidden.dtype  # products that write or add in place, no temporaries
        hidden_mm, weight_mm = hidden.to(mm_dtype), neg_weight.to(mm_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(neg_weight)
        grad_bias = torch.zeros_like(neg_bias)
        grad_positive = torch.empty_like(positive)
        loss = hidden.new_zeros(())
        for index, lo in enumerate(range(0, n_rows, rows)):
            block = slice(lo, min(lo + rows, n_rows))
            h, pos = hidden_mm[block], positive[block]
            if fused:
                logits = torch.addmm(neg_bias, h, weight_mm.T)
            else:
                logits = torch.mm(h, weight_mm.T).to(hidden.dtype).add_(neg_bias)
            if hits is None:
                logits.masked_fill_(negatives[None, :] == targets[block, None], float("-inf"))
            else:
                logits[hits[index]] = float("-inf")
            top = torch.maximum(logits.amax(1), pos)
            probs = logits.sub_(top[:, None]).exp_()
            pos_exp = (pos - top).exp()
            total = probs.sum(1) + pos_exp
            probs.div_(total[:, None])
            loss += (total.log() + top - pos).sum()
            probs_mm = probs.to(mm_dtype)
            if fused:
                torch.mm(probs_mm, weight_mm, out=grad_hidden[block])
                grad_weight.addmm_(probs_mm.T, h)
            else:  # bf16 products, summed over blocks in float32
                grad_hidden[block] = torch.mm(probs_mm, weight_mm)
                grad_weight += torch.mm(probs_mm.T, h)
            grad_bias += probs.sum(0)
            grad_positive[block] = pos_exp / total - 1.0
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_positive)
        return loss / n_rows

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, grad_bias, grad_positive = ctx.saved_tensors
        scale = grad_loss / len(grad_positive)
        return (grad_hidden * scale, grad_weight * scale, grad_bias * scale,
                grad_positive * scale, None, None, None)
