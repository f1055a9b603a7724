"""Central Gaussian noise on the average of clipped updates (no Flower imports).

The Gaussian mechanism on the *sum* of ``n`` client updates, each clipped to L2 norm
``C``: adding or removing one client moves the sum by at most ``C``, so noise
``N(0, (z C)^2 I)`` makes it ``(alpha, alpha / (2 z^2))``-RDP (Mironov 2017, Prop. 7);
with client subsampling the round is accounted by :mod:`flwr_guard.dp.accounting`.
Dividing the noised sum by ``n`` is post-processing, so the *uniform mean* gets noise
std ``z C / n`` per coordinate (McMahan et al. 2018, DP-FedAvg; TFF's
``DifferentiallyPrivateFactory`` divides the noised sum by the client count the same way).

Weighted means change the sensitivity: with weights ``w_i`` the mean
``sum w_i x_i / sum w_i`` moves by up to ``C * w_max / sum w`` when one client joins,
where ``w_max`` must be a *data-independent* cap on any client's weight (McMahan et al.
2018 cap each weight and divide by a fixed expected total). flwr-guard averages
uniformly and refuses nothing else silently: that is the bound it states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def central_noise_std(noise_multiplier: float, clipping_norm: float, num_contributors: int
                      ) -> float:
    """Per-coordinate noise std of the uniform mean: ``z * C / n``.

    Raises:
        ValueError: for ``z < 0``, ``C <= 0`` or ``n < 1``.
    """
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
    if clipping_norm <= 0:
        raise ValueError(f"clipping norm must be > 0, got {clipping_norm}")
    if num_contributors < 1:
        raise ValueError(f"need at least one contributor, got {num_contributors}")
    return noise_multiplier * clipping_norm / num_contributors


def add_gaussian_noise(
    arrays: Sequence[np.ndarray], std: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Return ``arrays`` plus i.i.d. ``N(0, std^2)`` noise (new arrays, same dtypes).

    Noise is drawn in float64 and cast back. For production use a generator seeded from
    the OS (``np.random.default_rng()``), never a fixed seed.
    """
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    out = []
    for a in arrays:
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"noise is added to floating-point arrays, got {a.dtype}")
        out.append((a.astype(np.float64) + rng.normal(0.0, std, a.shape)).astype(a.dtype))
    return out
