"""The synthetic task: one float32 vector, clients send global + a seeded update.

No training: a client's update is drawn from a seed of (node id, round), so the
server can recompute the exact weighted average it should obtain and nothing but
the aggregation protocol costs time.
"""

from __future__ import annotations

import numpy as np

UPDATE_SCALE = 0.1  # updates are uniform in [-0.1, 0.1]: never clipped


def initial_model(dimension: int) -> np.ndarray:
    """The global model of round 1: zeros, float32, shape ``(dimension,)``."""
    return np.zeros(dimension, dtype=np.float32)


def client_update(node_id: int, server_round: int, dimension: int) -> np.ndarray:
    """The update node ``node_id`` sends in ``server_round``: float32, ``(dimension,)``."""
    rng = np.random.default_rng([node_id % 2**63, server_round])
    return rng.uniform(-UPDATE_SCALE, UPDATE_SCALE, dimension).astype(np.float32)


def num_examples(node_id: int) -> int:
    """The node's weight (``num-examples``): 10..99, below every max_weight used."""
    return 10 + node_id % 90


def expected_average(node_ids: list[int], server_round: int, dimension: int) -> np.ndarray:
    """Exact weighted average update of ``node_ids`` (float64)."""
    total = np.zeros(dimension, dtype=np.float64)
    weight = 0
    for node in node_ids:
        total += num_examples(node) * client_update(node, server_round, dimension).astype(np.float64)
        weight += num_examples(node)
    return total / weight
