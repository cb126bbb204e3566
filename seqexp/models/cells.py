"""Recurrent cells for RecurrentRecommender, looked up by name (`model.cell`).

A cell runs a whole window: `forward(x, h0, user)` takes item inputs x [B, T, n], the initial
hidden state h0 [B, n] and the user vector v [B, n] (ignored by item-only cells) and returns the
outputs [B, T, n] and the last state [B, n]. The x- and v-dependent terms of all T steps are
computed in one matrix product before the step loop, which does only the h-dependent work.
"""

from __future__ import annotations

import torch
from torch import nn


class GRUCell(nn.Module):
    """Standard GRU, item input only, as written in the SPEC (Cho et al.):
    z = σ(W_z x + U_z h), r = σ(W_r x + U_r h), k = tanh(W x + U (r ⊙ h)),
    h' = (1 − z) ⊙ h + z ⊙ k."""

    uses_user = False

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        n = hidden_size
        self.input_proj = nn.Linear(n, 3 * n)  # [W_z; W_r; W] x + biases
        self.hidden_gates = nn.Linear(n, 2 * n, bias=False)  # [U_z; U_r] h
        self.hidden_candidate = nn.Linear(n, n, bias=False)  # U (r ⊙ h)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, user: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = h0.shape[-1]
        gates_x, candidate_x = self.input_proj(x).split([2 * n, n], dim=-1)
        h = h0
        outputs = []
        for t in range(x.shape[1]):
            z, r = torch.sigmoid(gates_x[:, t] + self.hidden_gates(h)).chunk(2, dim=-1)
            k = torch.tanh(candidate_x[:, t] + self.hidden_candidate(r * h))
            h = h + z * (k - h)  # (1 − z) ⊙ h + z ⊙ k
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class CudnnGRU(nn.Module):
    """PyTorch's fused GRU (cuDNN on CUDA). It applies the reset gate after the recurrent
    product, k = tanh(W x + r ⊙ (U h + b)), the form GRU4Rec and most libraries use; faster
    on a GPU, not the SPEC's equation, hence a separate name."""

    uses_user = False

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(hidden_size, hidden_size, batch_first=True)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, user: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.rnn(x, h0.unsqueeze(0).contiguous())
        return out, h.squeeze(0)


CELLS: dict[str, type[nn.Module]] = {"gru": GRUCell, "cudnn_gru": CudnnGRU}
