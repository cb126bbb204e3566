"""HRNN (Quadrana et al., RecSys 2017), the "init" variant: a session-level GRU whose state at
each session start is tanh(W_init c + b_init) of a user-level GRU state c, updated at each
session's end with that session's last state (equations: docs/models.md). Everything else
(embeddings, windows carried user-parallel across batches, the softmax, the replay at
evaluation) is RecurrentRecommender's, with the two states carried side by side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seqexp.core.schema import Key, number
from seqexp.models.cells import GRUCell
from seqexp.models.cpu_kernels import ItemInputs
from seqexp.models.recurrent import RecurrentRecommender, check_cell_options


class HierarchicalGRUCell(GRUCell):
    """The session GRU is `gru`'s cell, s' = GRU_ses(x, s). The carried state is [s; c], of
    size 2n. Where carry_mask[:, t] is 0 (the next event opens a session), after step t:
    c' = GRU_usr(s, c), s' = tanh(W_init c' + b_init), and output t is that s', the state the
    next session's first event is predicted from."""

    def __init__(self, hidden_size: int, *, init_dropout: float,
                 user_state_dropout: float) -> None:
        super().__init__(hidden_size)
        self.state_size = 2 * hidden_size
        self.user_gru = nn.GRUCell(hidden_size, hidden_size)
        self.init = nn.Linear(hidden_size, hidden_size)
        self.user_state_dropout = nn.Dropout(user_state_dropout)
        self.init_dropout = nn.Dropout(init_dropout)

    def session_start(self, session: torch.Tensor, user: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, c) at a session start: the user state updated with the ended session's last
        state, and the new session's initial state projected from it."""
        user = self.user_gru(self.user_state_dropout(session), user)
        return self.init_dropout(torch.tanh(self.init(user))), user

    def forward(
        self, x: torch.Tensor | ItemInputs, h0: torch.Tensor, user: torch.Tensor | None = None,
        carry_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_step, constants = self.input_terms(x, None)
        steps = list(zip(*(terms.unbind(1) for terms in per_step), strict=True))
        opens = (carry_mask == 0).unbind(1)
        session, user_state = h0.chunk(2, dim=-1)
        outputs = []
        for terms, open_next in zip(steps, opens, strict=True):
            session = self.step(session, terms, constants)
            rows = open_next.nonzero()[:, 0]
            if len(rows):  # only the rows whose next event opens a session
                started, updated = self.session_start(session[rows], user_state[rows])
                session = session.index_put((rows,), started)
                user_state = user_state.index_put((rows,), updated)
            outputs.append(session)
        return torch.stack(outputs, dim=1), torch.cat([session, user_state], dim=-1)


def check_session_gap(model: Mapping[str, Any]) -> str | None:
    """HRNN's two levels are sessions and the user: it needs a session gap."""
    if model.get("session_gap_s") is None:
        return ("model=hrnn needs session boundaries: set model.session_gap_s (seconds of a gap "
                "that ends a session, e.g. 1800)")
    return None


class HRNN(RecurrentRecommender):
    """RecurrentRecommender with the hierarchical cell; it needs the session gap."""

    cell_types = {"hrnn": HierarchicalGRUCell}

    config_keys = {
        key: entry for key, entry in RecurrentRecommender.config_keys.items()
        if key not in ("cell", "threshold", "temperature", "omega")} | {
        "user_state_dropout": Key(number(0.0, 1.0), "hrnn: dropout of the session state "
                                  "entering the user-level GRU"),
        "init_dropout": Key(number(0.0, 1.0), "hrnn: dropout of the session state projected "
                            "from the user-level state"),
    }
    config_checks = (check_session_gap, check_cell_options(cell_types, config_keys, "hrnn"))

    def __init__(self, n_items: int, n_users: int, *, session_gap_s: float, **options) -> None:
        super().__init__(n_items, n_users, cell="hrnn", session_gap_s=session_gap_s, **options)
