"""History-length quartiles: the grouping of test events by their user's number of training
events that the evaluator's hist_q<j> metrics and the report's MRR-by-history chart share."""

from __future__ import annotations

import numpy as np


def history_quartiles(history: np.ndarray, users: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Quartile (0..3) of each event's user by history length, and the five edges (min, the
    three quartile cuts, max) over the distinct users among `users`."""
    per_user = np.asarray(history)[np.unique(users)]
    edges = np.quantile(per_user, [0.0, 0.25, 0.5, 0.75, 1.0])
    quartile = np.searchsorted(edges[1:4], np.asarray(history)[users], side="left")
    return quartile, edges
