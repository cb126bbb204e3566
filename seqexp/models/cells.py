"""Recurrent cells for RecurrentRecommender, looked up by name (`model.cell`).

A cell runs a whole window: `forward(x, h0, user, carry_mask)` takes item inputs x [B, T, n],
the initial hidden state h0 [B, n], the user vector v [B, n] (constant along the window; ignored
by item-only cells) and optionally carry_mask [B, T] of 0/1 that restarts the state from h0 = 0
after a step (the end of a session, model.session_gap_s); it returns the outputs [B, T, n] and
the last state [B, n]. Every term that
does not depend on h is computed for all T steps in one matrix product before the step loop,
which does only the h-dependent work. Equations: docs/models.md (Donkers et al., RecSys 2017).
"""

from __future__ import annotations

import torch
from torch import nn

from seqexp.core.errors import SeqexpError
from seqexp.models.cpu_kernels import ItemInputs, dense, project


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


# Seeded initial weights: each user cell registers and initialises its layers in the order
# (and with the random draws) of the cells that were built as subclasses of the item-only GRU
# with some of its layers replaced, so a given seed still gives the same weights, hence the
# same metrics. Registration order matters too: the gradient-norm clip sums over parameters
# in that order.


def skip_initial_draws(*shapes: tuple[int, ...]) -> None:
    """Advance torch's random generator by the draws that initialising a tensor of each shape
    with uniform_ (an nn.Linear weight or bias) makes, keeping nothing."""
    with torch.no_grad():
        for shape in shapes:
            torch.empty(shape).uniform_()


def uninitialised_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An nn.Linear registered now and initialised later (`reset_parameters()`), no draws yet."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)


class UserGRUCell(nn.Module):
    """The step loop shared by every cell of docs/models.md.

    A cell states its equations in two parts: `input_terms` computes, for all T steps at once,
    every term that does not depend on h (one product over the window) and the per-window
    constants; `step` does the h-dependent work of one step. `forward(x, h0, user,
    carry_mask)` runs the window: x [B, T, n] (or ItemInputs), h0 [B, n], user [B, n] (ignored
    by item-only cells); carry_mask [B, T] of 0/1, when given, multiplies the state after
    step t by carry_mask[:, t], so a 0 makes output t zero and starts step t + 1 from h0 = 0.
    Returns the outputs [B, T, n] and the last state [B, n].
    """

    uses_user = False
    takes_carry_mask = True  # session-scoped states (model.session_gap_s) can use the cell

    def input_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                    ) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """(per-step terms, each [B, T, ·]; per-window constants passed to every step)."""
        raise NotImplementedError

    def step(self, h: torch.Tensor, terms: tuple[torch.Tensor, ...], constants: tuple
             ) -> torch.Tensor:
        """h' from h [B, n] and this step's input terms (each [B, ·])."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor | ItemInputs, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_step, constants = self.input_terms(x, user)
        # views, one backward op each
        steps = list(zip(*(terms.unbind(1) for terms in per_step), strict=True))
        keeps = ([None] * len(steps) if carry_mask is None
                 else carry_mask.to(h0.dtype).unsqueeze(-1).unbind(1))
        h, outputs = h0, []
        for terms, keep in zip(steps, keeps, strict=True):
            h = self.step(h, terms, constants)
            if keep is not None:
                h = h * keep
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class GRUCell(UserGRUCell):
    """`gru`: z = σ(W_z x + U_z h), r = σ(W_r x + U_r h), k = tanh(W x + U (r ⊙ h)),
    h' = (1 − z) ⊙ h + z ⊙ k (item input only)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        n = hidden_size
        self.input_proj = nn.Linear(n, 3 * n)  # [W_z; W_r; W] x + biases
        self.hidden_gates = nn.Linear(n, 2 * n, bias=False)  # [U_z; U_r] h
        self.hidden_candidate = nn.Linear(n, n, bias=False)  # U (r ⊙ h)

    def item_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                   ) -> torch.Tensor:
        """The non-recurrent parts of z, r and k, [B, T, 3n]."""
        return project(self.input_proj, x)

    def input_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                    ) -> tuple[tuple[torch.Tensor, ...], tuple]:
        n = self.hidden_candidate.in_features
        return self.item_terms(x, user).split([2 * n, n], dim=-1), ()

    def step(self, h: torch.Tensor, terms: tuple[torch.Tensor, ...], constants: tuple
             ) -> torch.Tensor:
        gate_in, candidate_in = terms
        return gated_update(gate_in, candidate_in, self.hidden_gates(h), h,
                            self.hidden_candidate)


class LinearUserGRUCell(GRUCell):
    """`linear_ugru`: the user vector v enters the gates and the candidate linearly,
    [z; r] = σ(T_{3n,2n} [h; x; v]), k = tanh(T (r ⊙ h) + T x + T v). The v terms are the
    same at every step, so they are computed once per window."""

    uses_user = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.user_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)

    def item_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
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


class RectifiedUserGRUCell(UserGRUCell):
    """`rectified_ugru`: as linear_ugru, with v rectified element-wise at every step by
    thresholds [κ1; κ2] = T_{3n,2n} [h; x; v] and a factor ω ∈ [0, 1].

    threshold=soft (default) relaxes the two step functions with a sigmoid of temperature
    `temperature`, so the κ map is trained; threshold=hard applies them exactly, which leaves
    the κ map without gradient (it stays at its initialisation). omega=None learns ω through a
    sigmoid (starting at 0.5); a number fixes it.
    """

    uses_user = True

    def __init__(self, hidden_size: int, *, threshold: str, temperature: float,
                 omega: float | None) -> None:
        super().__init__()
        n = hidden_size
        self.temperature = temperature if threshold == "soft" else None
        self.input_proj = nn.Linear(n, 3 * n)  # x terms of z, r, k + biases
        # the h parts of the gates and of κ share one product per step
        self.hidden_gates = uninitialised_linear(n, 4 * n, bias=False)
        skip_initial_draws((2 * n, n))
        self.hidden_candidate = nn.Linear(n, n, bias=False)  # U (r ⊙ h)
        self.user_proj = nn.Linear(n, 3 * n, bias=False)  # ṽ terms of z, r, k
        self.kappa_input = nn.Linear(n, 2 * n)  # x part of T_{3n,2n} for [κ1; κ2], + bias
        self.kappa_user = nn.Linear(n, 2 * n, bias=False)  # v part
        self.hidden_gates.reset_parameters()
        if omega is None:
            self.omega_logit = nn.Parameter(torch.zeros(()))  # ω = σ(0) = 0.5 at the start
        else:
            self.register_buffer("omega_fixed", torch.tensor(float(omega)))

    @property
    def omega(self) -> torch.Tensor:
        if hasattr(self, "omega_fixed"):
            return self.omega_fixed
        return torch.sigmoid(self.omega_logit)

    def input_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                    ) -> tuple[tuple[torch.Tensor, ...], tuple]:
        item_terms = project(self.input_proj, x)  # [B, T, 3n]
        kappa_terms = project(self.kappa_input, x) + self.kappa_user(user).unsqueeze(1)
        return (item_terms, kappa_terms), (user, self.omega)

    def step(self, h: torch.Tensor, terms: tuple[torch.Tensor, ...], constants: tuple
             ) -> torch.Tensor:
        (item_t, kappa_t), (user, omega) = terms, constants
        n = h.shape[-1]
        hidden_gates, hidden_kappa = self.hidden_gates(h).split([2 * n, 2 * n], dim=-1)
        kappa1, kappa2 = (kappa_t + hidden_kappa).chunk(2, dim=-1)
        v_rect = rectify(user, kappa1, kappa2, omega, self.temperature)
        gate_in, candidate_in = (item_t + self.user_proj(v_rect)).split([2 * n, n], dim=-1)
        return gated_update(gate_in, candidate_in, hidden_gates, h, self.hidden_candidate)


class AttentionalUserGRUCell(UserGRUCell):
    """`attentional_ugru`: an attention regulation gate ξ = σ(T h + T x + T v) mixes item and
    user, x̃ = (1 − ξ) ⊙ x, ṽ = ξ ⊙ v, then [z; r] = σ(T_{3n,2n} [h; x̃; ṽ]) and
    k = tanh(T (r ⊙ h) + T x̃ + T ṽ). ξ → 0 gives an item-only GRU, ξ → 1 drops the item."""

    uses_user = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        n = hidden_size
        self.input_proj = uninitialised_linear(2 * n, 3 * n)  # [x̃; ṽ] terms of z, r, k + biases
        self.hidden_gates = uninitialised_linear(n, 3 * n, bias=False)  # h terms of z, r and ξ
        skip_initial_draws((3 * n, n), (3 * n,), (2 * n, n))
        self.hidden_candidate = nn.Linear(n, n, bias=False)  # U (r ⊙ h)
        self.input_proj.reset_parameters()
        self.xi_input = nn.Linear(n, n)  # x term of ξ + bias
        self.xi_user = nn.Linear(n, n, bias=False)  # v term of ξ
        self.hidden_gates.reset_parameters()

    def input_terms(self, x: torch.Tensor | ItemInputs, user: torch.Tensor | None
                    ) -> tuple[tuple[torch.Tensor, ...], tuple]:
        xi_terms = project(self.xi_input, x) + self.xi_user(user).unsqueeze(1)  # [B, T, n]
        return (dense(x), xi_terms), (user,)

    def step(self, h: torch.Tensor, terms: tuple[torch.Tensor, ...], constants: tuple
             ) -> torch.Tensor:
        (x_t, xi_t), (user,) = terms, constants
        n = h.shape[-1]
        hidden_gates, hidden_xi = self.hidden_gates(h).split([2 * n, n], dim=-1)
        xi = torch.sigmoid(xi_t + hidden_xi)
        mixed = torch.cat([(1.0 - xi) * x_t, xi * user], dim=-1)
        gate_in, candidate_in = self.input_proj(mixed).split([2 * n, n], dim=-1)
        return gated_update(gate_in, candidate_in, hidden_gates, h, self.hidden_candidate)


class CudnnGRU(nn.Module):
    """`cudnn_gru`: PyTorch's fused GRU (cuDNN on CUDA). It applies the reset gate after the
    recurrent product, k = tanh(W x + r ⊙ (U h + b)), the form GRU4Rec and most libraries use;
    faster on a GPU but not docs/models.md's equation, hence a separate name."""

    uses_user = False
    takes_carry_mask = False  # the fused kernel runs a whole window from one state

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(hidden_size, hidden_size, batch_first=True)

    def forward(
        self, x: torch.Tensor | ItemInputs, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if carry_mask is not None:
            raise SeqexpError("model.cell=cudnn_gru cannot reset its state inside a window "
                              "(carry_mask); use model.cell=gru")
        out, h = self.rnn(dense(x), h0.unsqueeze(0).contiguous())
        return out, h.squeeze(0)


CELLS: dict[str, type[nn.Module]] = {
    "gru": GRUCell,
    "cudnn_gru": CudnnGRU,
    "linear_ugru": LinearUserGRUCell,
    "rectified_ugru": RectifiedUserGRUCell,
    "attentional_ugru": AttentionalUserGRUCell,
}
