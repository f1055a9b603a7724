"""Distributed DP under add/remove of one client: the removed client's noise leaves too.

Under distributed DP each of the ``n`` contributors adds its own share of the noise
(variance ``sigma^2 / m`` per coordinate, ``m`` = the contributors the noise was scaled
for; :mod:`flwr_guard.dp.distributed`). Neighbouring cohorts, as Flower's own
accountant defines them (``NeighboringRelation.ADD_OR_REMOVE_ONE``), differ by one
client, and that client takes *both* its update and its noise share with it:

- with it, the sum is ``N(s + x, (n / m) sigma^2 I_d)``;
- without it, ``N(s, ((n - 1) / m) sigma^2 I_d)``.

This is not the Gaussian mechanism with a fixed variance (which is the *zero-out*
relation: the client stays, its update becomes 0, its noise stays; Kairouz et al. 2021,
"Practical and Private (Deep) Learning without Sampling or Shuffling", §2). Its Rényi
divergence has the closed form for two multivariate normals (Gil, Alajaji & Linder
2013, "Rényi divergence measures for commonly used univariate continuous
distributions", Inf. Sci. 249, and its multivariate entry; also Pardo 2006, Statistical
Inference Based on Divergence Measures, p. 33): for ``P = N(mu_0, v_0 I_d)``,
``Q = N(mu_1, v_1 I_d)`` and ``v_a = a v_1 + (1 - a) v_0 > 0``::

    D_a(P || Q) = a ||mu_0 - mu_1||^2 / (2 v_a)
                  - d / (2 (a - 1)) * (ln v_a - (1 - a) ln v_0 - a ln v_1)

(``+inf`` where ``v_a <= 0``: removing a client, order ``a >= n``). The mechanism's RDP
at order ``a`` is the larger of the two directions with ``||mu_0 - mu_1||`` the L2
sensitivity (the divergence grows with it). Two consequences, both real:

- the second term grows with the dimension ``d``: every coordinate carries evidence
  that the noise variance is ``n`` or ``n - 1`` shares, so in high dimension the
  release nearly reveals whether the client took part. With ``d = 1`` this module gives
  the issue's reference values (cohort 4, 2 rounds, ``z = 1.2``, ``delta = 1e-5``:
  11.36 vs 5.72 zero-out; cohort 10, 25 rounds: 31.84 vs 27.37); with a model's ``d``
  the epsilon is far larger;
- a cohort of one contributor (``n = 1``) has no finite RDP at all.

The noise flwr-guard adds is Skellam (integers), not Gaussian: this is the *Gaussian
analogue* of the same variances. Agarwal, Kairouz & Liu 2021 (Theorem 3.5) bound the
gap for a mean shift at a fixed ``mu`` by ``O(1 / mu)``; no published bound covers two
Skellams of different ``mu``, so this accounting is an approximation there (with
``mu > 10^6`` per coordinate in flwr-guard's calibration), stated, not hidden.

Pure functions (NumPy); composition by addition over orders; the conversion to
``(epsilon, delta)`` is dp-accounting's ``rdp_privacy_accountant.compute_epsilon``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Orders for the add/remove relation: a fine fractional grid below 12 (a cohort of
#: ``n`` has finite RDP only for ``a < n``, so small cohorts need orders between the
#: integers), then the integers of the Skellam accounting up to 256.
ADD_REMOVE_ORDERS: tuple[float, ...] = (
    *(1.0 + k / 20 for k in range(1, 20)),
    *(2.0 + k / 10 for k in range(100)),
    *(float(a) for a in range(12, 257)),
)


def gaussian_pair_rdp(order: float, shift: float, var0: float, var1: float, dim: int) -> float:
    """``D_a(N(0, var0 I_d) || N(shift e_1, var1 I_d))`` (see the module docstring).

    Args:
        order: ``a > 1``.
        shift: L2 distance of the means (``>= 0``).
        var0, var1: per-coordinate variances (``> 0``).
        dim: ``d >= 1``.

    Returns:
        The divergence in nats; ``inf`` where ``a var1 + (1 - a) var0 <= 0``.
    """
    if not (order > 1 and var0 > 0 and var1 > 0 and dim >= 1 and shift >= 0):
        raise ValueError("need order > 1, variances > 0, dim >= 1 and shift >= 0")
    var_a = order * var1 + (1.0 - order) * var0
    if var_a <= 0:
        return math.inf
    mean_term = order * shift**2 / (2.0 * var_a)
    log_term = math.log(var_a) - (1.0 - order) * math.log(var0) - order * math.log(var1)
    return mean_term - dim * log_term / (2.0 * (order - 1.0))


def add_remove_rdp(orders: Sequence[float], sensitivity: float, share_variance: float,
                   contributors: int, dim: int) -> np.ndarray:
    """RDP of one distributed-DP sum under add/remove of one client (its share leaves).

    Args:
        orders: RDP orders (``> 1``).
        sensitivity: L2 sensitivity of one client's (quantised) update, in the units
            of the noise.
        share_variance: per-coordinate noise variance of one client's share
            (``2 mu`` for Skellam ``Sk(mu, mu)``; ``sigma^2 / m`` for Gaussian shares).
        contributors: ``n``, the clients whose update and noise reached the sum.
        dim: ``d``, the noised coordinates.

    Returns:
        float64 ``(len(orders),)``: ``max`` of both directions, ``inf`` where it has no
        finite value (every order for ``n = 1``).
    """
    if contributors < 1 or not share_variance > 0 or not sensitivity > 0:
        raise ValueError("need contributors >= 1, share variance > 0 and sensitivity > 0")
    if contributors == 1:
        return np.full(len(orders), math.inf)
    with_it = contributors * share_variance
    without = (contributors - 1) * share_variance
    return np.array([
        max(gaussian_pair_rdp(a, sensitivity, with_it, without, dim),
            gaussian_pair_rdp(a, sensitivity, without, with_it, dim))
        for a in orders
    ])
