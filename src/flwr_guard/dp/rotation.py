"""Randomised Hadamard rotation before quantisation (no Flower imports).

``R x = H D x / sqrt(d)`` with ``D`` a diagonal of random signs and ``H`` the
Walsh-Hadamard matrix (``d`` padded to a power of two). ``R`` is orthogonal, so norms are
preserved, and it spreads a vector's energy evenly over the coordinates: each
coordinate of ``R x`` is sub-Gaussian with scale ``||x|| / sqrt(d)`` (Suresh, Yu, Kumar &
McMahan 2017, "Distributed Mean Estimation with Limited Communication", §3; used for
distributed DP by Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian
Mechanism", §4). That keeps the modular sum from wrapping with far fewer bits than a
peaked update would need, and keeps quantisation error per coordinate uniform.

The signs come from a seeded NumPy ``Philox`` generator: the seed is *public* (shared by
all clients and the server of a round); the rotation protects nothing by itself.
"""

from __future__ import annotations

import numpy as np


def _fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length 2^k)."""
    n = x.shape[-1]
    y = x.astype(np.float64, copy=True)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack((a + b, a - b), axis=2).reshape(-1, n)
        h *= 2
    return (y / np.sqrt(n)).reshape(x.shape)


def _signs(seed: int, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(seed))
    return rng.integers(0, 2, n, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def randomized_hadamard(x: np.ndarray, seed: int) -> np.ndarray:
    """Rotate a 1-D float vector; pads with zeros to the next power of two.

    Args:
        x: ``(d,)`` real vector.
        seed: non-negative int, the round's public rotation seed.

    Returns:
        float64 ``(2^ceil(log2 d),)``, same L2 norm as ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty 1-D vector, got shape {x.shape}")
    n = 1 << (x.shape[0] - 1).bit_length()
    padded = np.zeros(n)
    padded[: x.shape[0]] = x
    return _fwht(padded * _signs(seed, n))


def inverse_randomized_hadamard(y: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """Undo :func:`randomized_hadamard` and drop the padding: float64 ``(dim,)``."""
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[0]
    if n & (n - 1) or n < dim:
        raise ValueError(f"rotated vector length {n} is not a power of two >= {dim}")
    return (_fwht(y) * _signs(seed, n))[:dim]
