"""Many users through a user tower at once, grouped by sequence length.

A user tower reads left-padded sequences whose positions count back from the
newest item, with padding masked out (``ServingModel.user_vectors``), so the
padding that every user of a group shares on the left changes nothing but the
work: a group of users with at most n real positions can run at length n.
Sorting users by length before grouping makes those groups tight. Measured
(DESIGN §9): a 256-user batch at L = 50 went from 127 ms to 36 ms, same vectors.
"""
from __future__ import annotations

import numpy as np

from model.serving.contract import ServingModel


def user_vectors_by_length(
    model: ServingModel,
    table: np.ndarray,
    rows: np.ndarray,
    actions: np.ndarray,
    users_per_call: int,
) -> np.ndarray:
    """``model.user_vectors(table[rows], actions)``, in length-sorted groups of ``users_per_call``.

    table:   (E, d) item vectors; row 0 is the padding (zeros)
    rows:    (B, L) int rows into ``table``, left-padded
    actions: (B, L) action codes, 0 at padding
    returns  (B, d) float32 in the users' order
    """
    count, length = actions.shape
    if count == 0:
        return np.zeros((0, model.fused_dim), np.float32)
    real = actions > 0  # (B, L)
    # Positions from each user's first real entry to the newest; 0 for a user with none.
    used = np.where(real.any(axis=1), length - real.argmax(axis=1), 0)  # (B,)
    order = np.argsort(used, kind="stable")
    vectors = np.empty((count, model.fused_dim), np.float32)
    for start in range(0, count, users_per_call):
        group = order[start:start + users_per_call]
        width = max(int(used[group].max()), 1)  # a user with no items still gets one (padding) position
        # (g, width, d): only the columns some user of the group uses.
        vectors[group] = model.user_vectors(table[rows[group, -width:]], actions[group, -width:])
    return vectors
