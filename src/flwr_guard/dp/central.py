"""Central Gaussian noise on the average of clipped updates (no Flower imports).

The Gaussian mechanism on the *sum* of ``n`` client updates, each clipped to L2 norm
``C``: adding or removing one client moves the sum by at most ``C``, so noise
``N(0, (z C)^2 I)`` makes it ``(alpha, alpha / (2 z^2))``-RDP (Mironov 2017, Prop. 7);
with client subsampling the round is accounted by :mod:`flwr_guard.dp.accounting`.
Dividing the noised sum by a *fixed* ``n`` (the expected number of contributors, not
the realised count: a count without noise is not public under add/remove-one) is
post-processing, so the mean gets noise std ``z C / n`` per coordinate (McMahan et al.
2018, DP-FedAvg, the "fixed denominator" estimator; TFF's DP aggregators and Opacus also
divide by an expected, fixed size). Dividing by the realised count would make the
noise depend on it.

**Floating-point caveat.** :func:`add_gaussian_noise` draws float64 ``rng.normal``
samples; Mironov (2012, "On Significance of the Least Significant Bits for Differential
Privacy", CCS) showed that the low bits of textbook floating-point noise can reveal the
un-noised value, so the guarantee holds for ideal real-valued noise, not exactly for
these samples (Opacus issue 616 discusses the same for DP-SGD; Opacus' ``secure_mode``
mitigates it). The secure path is :func:`add_skellam_noise_to_sum`: the sum is rounded
to a lattice ``gamma Z^d`` and integer Skellam noise is added, so the release is a
lattice point whose low bits carry nothing but the noise; it is accounted with
Skellam's own RDP (:mod:`flwr_guard.dp.skellam_accounting`).

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

from flwr_guard.dp.distributed import (
    MU_MAX,
    add_skellam_noise,
    quantised_l2_bound,
    stochastic_round,
)
from flwr_guard.dp.skellam_accounting import quantised_l1_bound


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


def add_skellam_noise_to_sum(
    update_sum: Sequence[np.ndarray], noise_multiplier: float, clipping_norm: float,
    rng: np.random.Generator, precision: float = 1e-3,
) -> tuple[list[np.ndarray], tuple[float, float, float]]:
    """The secure central path: lattice rounding + integer Skellam noise on a sum.

    The sum of clipped updates (float arrays, L2 sensitivity ``C``) is divided by the
    step ``gamma = precision * C / sqrt(d)``, rounded stochastically to integers (which
    raises the integer sensitivity to ``D = C / gamma + sqrt(d)``,
    :func:`~flwr_guard.dp.distributed.quantised_l2_bound`), given ``Sk(mu, mu)`` noise
    with ``2 mu = (z D)^2`` (the variance of the Gaussian mechanism with multiplier
    ``z``), and scaled back. The real-unit noise std is ``z C (1 + precision)``.

    Args:
        update_sum: float arrays, the sum of the clipped updates.
        noise_multiplier: ``z > 0``.
        clipping_norm: ``C > 0``.
        rng: generator for the rounding and the noise (OS-seeded in production).
        precision: rounding overhead on the sensitivity (default 0.1 %).

    Returns:
        ``(noised sum as float64 arrays, (D, D1, mu))``: the last is the Skellam step to
        account (:class:`~flwr_guard.dp.accounting.Step` ``skellam=``).

    Raises:
        ValueError: for ``z <= 0``, ``C <= 0``, or non-finite values.
    """
    if not (noise_multiplier > 0 and clipping_norm > 0):
        raise ValueError("the Skellam path needs noise multiplier > 0 and clipping norm > 0")
    arrays = [np.asarray(a, dtype=np.float64) for a in update_sum]
    dim = sum(a.size for a in arrays)
    step, (l2, l1, mu) = central_skellam_parameters(noise_multiplier, clipping_norm, dim,
                                                    precision)
    flat = np.concatenate([a.ravel() for a in arrays])
    noised = add_skellam_noise(stochastic_round(flat / step, rng), mu, rng).astype(np.float64) * step
    out, offset = [], 0
    for a in arrays:
        out.append(noised[offset:offset + a.size].reshape(a.shape))
        offset += a.size
    return out, (l2, l1, mu)


def central_skellam_parameters(noise_multiplier: float, clipping_norm: float, dim: int,
                               precision: float = 1e-3
                               ) -> tuple[float, tuple[float, float, float]]:
    """``(gamma, (D, D1, mu))`` of :func:`add_skellam_noise_to_sum` for ``dim`` values."""
    if not (noise_multiplier > 0 and clipping_norm > 0 and dim >= 1):
        raise ValueError("the Skellam path needs noise multiplier > 0, clipping norm > 0, dim >= 1")
    step = precision * clipping_norm / math.sqrt(dim)
    # NumPy's Poisson sampler is exact up to MU_MAX: coarser steps where needed.
    max_ratio = math.sqrt(2.0 * MU_MAX) / noise_multiplier - math.sqrt(dim)
    if max_ratio <= 0:
        raise ValueError("dimension too large for exact Skellam sampling")
    step = max(step, clipping_norm / max_ratio)
    l2 = quantised_l2_bound(clipping_norm, step, dim)
    return step, (l2, quantised_l1_bound(l2, dim), (noise_multiplier * l2) ** 2 / 2.0)
