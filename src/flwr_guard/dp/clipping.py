"""Update clipping for user-level DP-FedAvg, fixed and adaptive (no Flower imports).

- Fixed clipping: scale a client's whole update (all arrays together) to L2 norm at
  most the clipping norm ``C`` (McMahan et al. 2018, "Learning Differentially Private
  Recurrent Language Models", Algorithm 1).
- Adaptive clipping: the clipping norm tracks a target quantile of the update norms
  with a geometric update driven by a *noised* count of unclipped clients (Andrew,
  Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
  Clipping", Algorithm 1 and Theorem 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def global_l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of the concatenation of ``arrays`` (computed in float64)."""
    return math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in
                         (np.asarray(x, dtype=np.float64) for x in arrays)))


def clip_update(
    update: Sequence[np.ndarray], clipping_norm: float
) -> tuple[list[np.ndarray], float, bool]:
    """Scale ``update`` so that its global L2 norm is at most ``clipping_norm``.

    Args:
        update: the client's update (local - global), one float array per tensor.
        clipping_norm: ``C > 0``.

    Returns:
        ``(clipped, norm, unclipped)``: new arrays (same dtypes and shapes), the norm
        before clipping, and whether ``norm <= C`` (Andrew et al.'s bit ``b``).

    Raises:
        ValueError: for ``C <= 0``, non-float arrays or non-finite values.
    """
    if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
        raise ValueError(f"clipping norm must be finite and > 0, got {clipping_norm}")
    for a in update:
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            raise ValueError(f"update arrays must be floating point, got {np.asarray(a).dtype}")
    norm = global_l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("update holds non-finite values (NaN or inf)")
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = [(np.asarray(a, dtype=np.float64) * scale).astype(np.asarray(a).dtype) for a in update]
    return clipped, norm, norm <= clipping_norm


def split_noise_multiplier(
    noise_multiplier: float, count_stddev: float
) -> float:
    """Noise multiplier left for the updates when the clipped count is noised too.

    Andrew et al. 2021, Theorem 1: running the update mechanism with ``z_delta`` and
    the count with standard deviation ``sigma_b`` is as private as one Gaussian
    mechanism with ``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2``; so for a target ``z``,
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``. Account the round with ``z``.

    Raises:
        ValueError: if ``count_stddev <= z / 2`` (the count alone would exceed the
            budget of the round: raise ``count_stddev``).
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    if count_stddev <= noise_multiplier / 2:
        raise ValueError(
            f"clipped-count stddev {count_stddev} must exceed noise_multiplier / 2 = "
            f"{noise_multiplier / 2}; Andrew et al. suggest expected clients / 20"
        )
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def update_clipping_norm(
    clipping_norm: float,
    centred_count: float,
    expected_clients: float,
    target_quantile: float,
    learning_rate: float,
    count_stddev: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """One geometric step of adaptive clipping (Andrew et al. 2021, Algorithm 1).

    The clients' bits are *centred*, ``b_i - 1/2`` (Andrew et al. 2021, §3: adding or
    removing one client moves their sum by at most 1/2, the sensitivity that
    :func:`split_noise_multiplier`'s ``2 sigma_b`` assumes; {0, 1} bits would have
    sensitivity 1 and be under-noised by a factor 2). With ``expected_clients`` ``n``
    (a fixed denominator, not the realised count):
    ``b_noisy = (sum(b_i - 1/2) + N(0, count_stddev^2)) / n + 1/2`` and
    ``C_next = C * exp(-learning_rate * (b_noisy - target_quantile))``.

    Args:
        clipping_norm: ``C_t``, the norm the clients used this round.
        centred_count: ``sum(b_i - 1/2)`` over this round's clients, ``b_i`` =
            ``1[||update_i|| <= C_t]``.
        expected_clients: the expected cohort size ``n > 0``.
        target_quantile: ``gamma`` in ``[0, 1]``, fraction of updates left unclipped.
        learning_rate: ``eta_C > 0`` (0.2 in the paper).
        count_stddev: ``sigma_b >= 0``.
        rng: NumPy generator for the count noise.

    Returns:
        ``(C_next, b_noisy)``.
    """
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target quantile must be in [0, 1], got {target_quantile}")
    if expected_clients <= 0 or learning_rate <= 0 or count_stddev < 0:
        raise ValueError("expected_clients and learning_rate must be > 0, count_stddev >= 0")
    noisy = (centred_count + rng.normal(0.0, count_stddev)) / expected_clients + 0.5
    return clipping_norm * math.exp(-learning_rate * (noisy - target_quantile)), noisy
