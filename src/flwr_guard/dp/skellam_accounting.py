"""RDP of the Skellam mechanism and a subsampling bound valid for any mechanism (no Flower).

Distributed DP in flwr-guard adds Skellam noise (:mod:`flwr_guard.dp.distributed`); the
sum of ``n`` clients' noise is ``Sk(mu, mu)`` per coordinate with ``mu = n * mu_client``.
It is *not* accounted as a Gaussian of the same variance (whose subsampled RDP and PLD
are not upper bounds for Skellam) but with:

- **Skellam's own RDP** (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for
  Differentially Private Federated Learning", NeurIPS, Theorem 3.5 / Corollary 3.6):
  for integer vectors of L1 sensitivity ``D1`` and L2 sensitivity ``D2``, noise
  ``Sk(mu, mu)`` per coordinate is ``(alpha, eps(alpha))``-RDP for integer
  ``alpha > 1`` with ``eps(alpha) = alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 +
  6 D1) / (16 mu^2), 3 D1 / (4 mu))``. The first term is the Gaussian's with variance
  ``2 mu``; the second is the price of discreteness.
- **Poisson subsampling, generic bound** (Zhu & Wang 2019, "Poisson Subsampled Rényi
  Differential Privacy", ICML, Theorem 6): valid for *any* mechanism at integer orders.
  flwr-guard never applies it against the server in distributed mode (the server picks
  the cohort); it exists to compare with the Gaussian accounting and for a user who
  really samples Poisson with a trusted sampler.

The RDP values are composed by addition and converted to ``(epsilon, delta)`` by
dp-accounting's ``rdp_privacy_accountant.compute_epsilon`` (Canonne, Kamath & Steinke
2020 / Asoodeh et al. 2020 conversion), never by a conversion of our own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from numpy.typing import ArrayLike
from scipy.special import gammaln, logsumexp

# Integer orders (Theorem 3.5 and the generic subsampling bound hold at integer alpha).
SKELLAM_ORDERS: tuple[int, ...] = tuple(range(2, 257))


def skellam_rdp(orders: Sequence[int], l2_sensitivity: float, l1_sensitivity: float,
                mu: float) -> np.ndarray:
    """RDP ``eps(alpha)`` of the Skellam mechanism ``Sk(mu, mu)`` per coordinate.

    Args:
        orders: integer orders ``alpha >= 2``.
        l2_sensitivity: ``D2``, L2 sensitivity of the integer vector.
        l1_sensitivity: ``D1``, its L1 sensitivity (for integer vectors ``D1 <= D2^2``
            and ``D1 <= sqrt(d) D2``: :func:`quantised_l1_bound`).
        mu: Skellam parameter of the *sum's* noise (``> 0``; variance ``2 mu``).

    Returns:
        float64 ``(len(orders),)``.

    Raises:
        ValueError: for non-integer orders, ``mu <= 0`` or negative sensitivities.
    """
    a = np.asarray(orders, dtype=np.float64)
    if not (np.all(a >= 2) and np.all(a == np.round(a))):
        raise ValueError("Skellam RDP is stated for integer orders >= 2")
    if not (mu > 0 and math.isfinite(mu)) or l2_sensitivity < 0 or l1_sensitivity < 0:
        raise ValueError("need mu > 0 and non-negative sensitivities")
    d2, d1 = float(l2_sensitivity) ** 2, float(l1_sensitivity)
    extra = np.minimum(((2 * a - 1) * d2 + 6 * d1) / (16 * mu**2), 3 * d1 / (4 * mu))
    return a * d2 / (4 * mu) + extra


def quantised_l1_bound(l2_sensitivity: float, dim: int) -> float:
    """``min(D2^2, sqrt(d) D2)``: L1 sensitivity of an integer vector of L2 norm ``D2``
    (``|x_i| <= x_i^2`` for integers; Cauchy-Schwarz)."""
    return min(l2_sensitivity**2, math.sqrt(dim) * l2_sensitivity)


def _log_comb(n: float, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def poisson_subsampled_rdp(orders: Sequence[int], rdp: ArrayLike, q: float) -> np.ndarray:
    """Zhu & Wang 2019, Theorem 6: RDP of any mechanism under Poisson sampling rate ``q``.

    ``eps'(alpha) <= log((1-q)^(alpha-1) (alpha q - q + 1) + C(alpha, 2) q^2 (1-q)^(alpha-2)
    e^eps(2) + 3 sum_{l=3}^{alpha} C(alpha, l) (1-q)^(alpha-l) q^l e^((l-1) eps(l)))
    / (alpha - 1)``, for integer ``alpha >= 2``.

    Args:
        orders: the integer orders ``2, 3, ..., A`` (consecutive from 2: the sum needs
            ``eps(l)`` for every ``l <= alpha``).
        rdp: the mechanism's RDP at those orders.
        q: sampling rate in ``[0, 1]``.

    Returns:
        float64 ``(len(orders),)``; ``q = 1`` returns ``rdp`` unchanged.
    """
    a = np.asarray(orders, dtype=np.int64)
    eps = np.asarray(rdp, dtype=np.float64)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample rate must be in [0, 1], got {q}")
    if a.shape != eps.shape or a[0] != 2 or np.any(np.diff(a) != 1):
        raise ValueError("orders must be 2, 3, ..., A with one RDP value each")
    if q == 1.0:
        return eps.copy()
    if q == 0.0:
        return np.zeros_like(eps)
    by_order = dict(zip(a.tolist(), eps.tolist(), strict=True))
    lq, l1q = math.log(q), math.log1p(-q)
    out = np.empty_like(eps)
    for i, alpha in enumerate(a.tolist()):
        terms = [(alpha - 1) * l1q + math.log(alpha * q - q + 1),
                 float(_log_comb(alpha, np.array(2.0))) + 2 * lq + (alpha - 2) * l1q + by_order[2]]
        if alpha >= 3:
            ells = np.arange(3, alpha + 1, dtype=np.float64)
            logs = (math.log(3) + _log_comb(alpha, ells) + (alpha - ells) * l1q + ells * lq
                    + (ells - 1) * np.array([by_order[int(e)] for e in ells]))
            terms.extend(logs.tolist())
        out[i] = float(logsumexp(terms)) / (alpha - 1)
    return np.minimum(out, eps)  # subsampling never costs more than the mechanism itself


def epsilon_from_rdp(orders: Sequence[float], rdp: ArrayLike, delta: float) -> float:
    """``(epsilon, delta)`` from an RDP curve, by dp-accounting's ``compute_epsilon``."""
    curve = np.asarray(rdp, dtype=np.float64).tolist()
    eps, _ = rdp_privacy_accountant.compute_epsilon(list(orders), curve, delta)
    return float(eps)
