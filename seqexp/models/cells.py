"""Recurrent cells for RecurrentRecommender, looked up by name (`model.cell`).

A cell runs a whole window: `forward(x, h0, user, carry_mask)` takes item inputs x [B, T, n],
the initial hidden state h0 [B, n], the user vector v [B, n] (constant along the window; ignored
by item-only cells) and optionally carry_mask [B, T] of 0/1: after step t the state is
multiplied by carry_mask[:, t], so a 0 restarts the recurrence from h0 = 0 there (a session
end); the outputs [B, T, n] hold the states so masked. It returns the outputs and the last
state [B, n]. Every term that
does not depend on h is computed for all T steps in one matrix product before the step loop,
which does only the h-dependent work. Equations: SPEC §4 (Donkers et al., RecSys 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqexp.core.errors import SeqexpError


class ItemInputs:
    """Item inputs as ids into the embedding table, for a replay without dropout: a cell's
    products of the input alone (W x, ...) are then made once per item of the catalogue and
    looked up per event. The same values (each row of a product is computed alone), at a
    fraction of the cost when the replayed events far outnumber the items. `tables` holds the
    products made so far and is shared by every chunk of one replay."""

    def __init__(self, items: torch.Tensor, embedding: torch.Tensor,
                 tables: dict[nn.Module, torch.Tensor]) -> None:
        self.items = items
        self.embedding = embedding
        self.tables = tables

    def project(self, layer: nn.Module) -> torch.Tensor:
        if layer not in self.tables:
            self.tables[layer] = layer(self.embedding)
        return F.embedding(self.items, self.tables[layer])

    def dense(self) -> torch.Tensor:
        return F.embedding(self.items, self.embedding)


def project(layer: nn.Module, x: torch.Tensor | ItemInputs) -> torch.Tensor:
    """layer(x), through the per-item table when x is given as ItemInputs."""
    return x.project(layer) if isinstance(x, ItemInputs) else layer(x)


def dense(x: torch.Tensor | ItemInputs) -> torch.Tensor:
    return x.dense() if isinstance(x, ItemInputs) else x


def gated_update(gate_inputs: torch.Tensor, candidate_input: torch.Tensor,
                 hidden_gate_terms: torch.Tensor, h: torch.Tensor,
                 hidden_candidate: nn.Linear) -> torch.Tensor:
    """One GRU-style step shared by every cell.

    `gate_inputs` [B, 2n] holds the non-recurrent parts of the update gate z and the reset gate
    r, `candidate_input` [B, n] that of the candidate k, `hidden_gate_terms` [B, 2n] the
    recurrent parts of z and r. Then z, r = σ(·), k = tanh(input part + U (r ⊙ h)),
    h' = (1 − z) ⊙ h + z ⊙ k.
    """
    z, r = torch.sigmoid(gate_inputs + hidden_gate_terms).chunk(2, dim=-1)
    k = torch.tanh(candidate_input + hidden_candidate(r * h))
    return h + z * (k - h)


def carried(h: torch.Tensor, carry_mask: torch.Tensor | None, step: int) -> torch.Tensor:
    """The state after `step` as the next step and the output see it: zeroed where the
    sequence's session ends (carry_mask 0); unchanged without a mask."""
    return h if carry_mask is None else h * carry_mask[:, step, None]


def split_steps(terms: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """[B, T, sum(sizes)] -> per step, the pieces [B, size] (views; one backward op each)."""
    pieces = [part.unbind(1) for part in terms.split(sizes, dim=-1)]
    return list(zip(*pieces, strict=True))


class GRUCell(nn.Module):
    """`gru`: z = σ(W_z x + U_z h), r = σ(W_r x + U_r h), k = tanh(W x + U (r ⊙ h)),
    h' = (1 − z) ⊙ h + z ⊙ k (item input only)."""

    uses_user = False
    takes_carry_mask = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        n = hidden_size
        self.input_proj = nn.Linear(n, 3 * n)  # [W_z; W_r; W] x + biases
        self.hidden_gates = nn.Linear(n, 2 * n, bias=False)  # [U_z; U_r] h
        self.hidden_candidate = nn.Linear(n, n, bias=False)  # U (r ⊙ h)

    def input_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                    ) -> torch.Tensor:
        return project(self.input_proj, x)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = h0.shape[-1]
        h, outputs = h0, []
        steps = split_steps(self.input_terms(x, user), [2 * n, n])
        for t, (gate_in, candidate_in) in enumerate(steps):
            h = gated_update(gate_in, candidate_in, self.hidden_gates(h), h,
                             self.hidden_candidate)
            h = carried(h, carry_mask, t)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class LinearUserGRUCell(GRUCell):
    """`linear_ugru`: the user vector v enters the gates and the candidate linearly,
    [z; r] = σ(T_{3n,2n} [h; x; v]), k = tanh(T (r ⊙ h) + T x + T v). The v terms are the
    same at every step, so they are computed once per window."""

    uses_user = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.user_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)

    def input_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                    ) -> torch.Tensor:
        return project(self.input_proj, x) + self.user_proj(user).unsqueeze(1)


def rectify(v: torch.Tensor, kappa1: torch.Tensor, kappa2: torch.Tensor, omega: torch.Tensor,
            temperature: float | None = None) -> torch.Tensor:
    """ṽ_l = 0 if v_l < κ1_l, ω·v_l if κ1_l ≤ v_l < κ2_l, v_l otherwise.

    temperature None = the hard thresholds (κ gets no gradient); otherwise each step function
    is a sigmoid of (v − κ) / temperature, which tends to the hard rule as temperature → 0.
    """
    if temperature is None:
        above1, above2 = (v >= kappa1).to(v.dtype), (v >= kappa2).to(v.dtype)
    else:
        above1 = torch.sigmoid((v - kappa1) / temperature)
        above2 = torch.sigmoid((v - kappa2) / temperature)
    return v * above1 * (omega + (1.0 - omega) * above2)


class RectifiedUserGRUCell(GRUCell):
    """`rectified_ugru`: as linear_ugru, with v rectified element-wise at every step by
    thresholds [κ1; κ2] = T_{3n,2n} [h; x; v] and a factor ω ∈ [0, 1].

    threshold=soft (default) relaxes the two step functions with a sigmoid of temperature
    `temperature`, so the κ map is trained; threshold=hard applies them exactly, which leaves
    the κ map without gradient (it stays at its initialisation). omega=None learns ω through a
    sigmoid (starting at 0.5); a number fixes it.
    """

    uses_user = True

    def __init__(self, hidden_size: int, threshold: str = "soft", temperature: float = 0.1,
                 omega: float | None = None) -> None:
        super().__init__(hidden_size)
        n = hidden_size
        self.temperature = temperature if threshold == "soft" else None
        self.user_proj = nn.Linear(n, 3 * n, bias=False)  # ṽ terms of z, r, k
        self.kappa_input = nn.Linear(n, 2 * n)  # x part of T_{3n,2n} for [κ1; κ2], + bias
        self.kappa_user = nn.Linear(n, 2 * n, bias=False)  # v part
        # the h parts of the gates and of κ share one product per step
        self.hidden_gates = nn.Linear(n, 4 * n, bias=False)
        if omega is None:
            self.omega_logit = nn.Parameter(torch.zeros(()))  # ω = σ(0) = 0.5 at the start
        else:
            self.register_buffer("omega_fixed", torch.tensor(float(omega)))

    @property
    def omega(self) -> torch.Tensor:
        if hasattr(self, "omega_fixed"):
            return self.omega_fixed
        return torch.sigmoid(self.omega_logit)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = h0.shape[-1]
        item_terms = project(self.input_proj, x)  # [B, T, 3n]
        kappa_terms = project(self.kappa_input, x) + self.kappa_user(user).unsqueeze(1)
        omega = self.omega
        h, outputs = h0, []
        steps = zip(item_terms.unbind(1), kappa_terms.unbind(1), strict=True)
        for t, (item_t, kappa_t) in enumerate(steps):
            hidden_gates, hidden_kappa = self.hidden_gates(h).split([2 * n, 2 * n], dim=-1)
            kappa1, kappa2 = (kappa_t + hidden_kappa).chunk(2, dim=-1)
            v_rect = rectify(user, kappa1, kappa2, omega, self.temperature)
            gate_in, candidate_in = (item_t + self.user_proj(v_rect)).split([2 * n, n], dim=-1)
            h = gated_update(gate_in, candidate_in, hidden_gates, h, self.hidden_candidate)
            h = carried(h, carry_mask, t)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class AttentionalUserGRUCell(GRUCell):
    """`attentional_ugru`: an attention regulation gate ξ = σ(T h + T x + T v) mixes item and
    user, x̃ = (1 − ξ) ⊙ x, ṽ = ξ ⊙ v, then [z; r] = σ(T_{3n,2n} [h; x̃; ṽ]) and
    k = tanh(T (r ⊙ h) + T x̃ + T ṽ). ξ → 0 gives an item-only GRU, ξ → 1 drops the item."""

    uses_user = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        n = hidden_size
        self.input_proj = nn.Linear(2 * n, 3 * n)  # [x̃; ṽ] terms of z, r, k + biases
        self.xi_input = nn.Linear(n, n)  # x term of ξ + bias
        self.xi_user = nn.Linear(n, n, bias=False)  # v term of ξ
        self.hidden_gates = nn.Linear(n, 3 * n, bias=False)  # h terms of z, r and ξ

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = h0.shape[-1]
        xi_terms = project(self.xi_input, x) + self.xi_user(user).unsqueeze(1)  # [B, T, n]
        h, outputs = h0, []
        steps = zip(dense(x).unbind(1), xi_terms.unbind(1), strict=True)
        for t, (x_t, xi_t) in enumerate(steps):
            hidden_gates, hidden_xi = self.hidden_gates(h).split([2 * n, n], dim=-1)
            xi = torch.sigmoid(xi_t + hidden_xi)
            mixed = torch.cat([(1.0 - xi) * x_t, xi * user], dim=-1)
            gate_in, candidate_in = self.input_proj(mixed).split([2 * n, n], dim=-1)
            h = gated_update(gate_in, candidate_in, hidden_gates, h, self.hidden_candidate)
            h = carried(h, carry_mask, t)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class CudnnGRU(nn.Module):
    """`cudnn_gru`: PyTorch's fused GRU (cuDNN on CUDA). It applies the reset gate after the
    recurrent product, k = tanh(W x + r ⊙ (U h + b)), the form GRU4Rec and most libraries use;
    faster on a GPU but not the SPEC's equation, hence a separate name."""

    uses_user = False
    takes_carry_mask = False  # the fused kernel runs a whole window from one state

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(hidden_size, hidden_size, batch_first=True)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if carry_mask is not None:
            raise SeqexpError("model.cell=cudnn_gru cannot restart its state inside a window; "
                              "use model.cell=gru with model.session_gap_s")
        out, h = self.rnn(dense(x), h0.unsqueeze(0).contiguous())
        return out, h.squeeze(0)


CELLS: dict[str, type[nn.Module]] = {
    "gru": GRUCell,
    "cudnn_gru": CudnnGRU,
    "linear_ugru": LinearUserGRUCell,
    "rectified_ugru": RectifiedUserGRUCell,
    "attentional_ugru": AttentionalUserGRUCell,
}
