"""Quantisation of real vectors into integers for modular aggregation.

A coordinate is clipped to ``[-r, r]``, mapped to ``[0, L]`` and rounded
stochastically (rounded up with probability equal to the fractional part), which
is unbiased: E[q] = (clip(x) + r) * L / 2r. The weighted sum of quantised vectors is
exact in modular arithmetic, so the dequantised weighted average differs from the
weighted average of the clipped inputs by less than one step ``2r / L`` per
coordinate (and by zero in expectation).
"""

from __future__ import annotations

import numpy as np


def quantize(
    values: np.ndarray, clipping_range: float, quantization_range: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Clip and stochastically round ``values`` to integers in ``[0, L]``.

    Args:
        values: real array of any shape (float32/float64); NaN and Inf are refused.
        clipping_range: r > 0.
        quantization_range: L >= 1.
        rng: randomness of the rounding.

    Returns:
        ``(q, clipped)``: int64 array of ``values.shape``, and how many coordinates
        were clipped.

    Raises:
        ValueError: if ``values`` holds NaN or Inf.
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("update holds NaN or Inf: refusing to quantise it")
    clipped = int(np.count_nonzero(np.abs(values) > clipping_range))
    scaled = (np.clip(values, -clipping_range, clipping_range) + clipping_range) * (
        quantization_range / (2.0 * clipping_range)
    )
    floor = np.floor(scaled)
    q = floor + (rng.random(values.shape) < (scaled - floor))
    return np.clip(q, 0, quantization_range).astype(np.int64), clipped


def dequantize_mean(
    total: np.ndarray, total_weight: int, clipping_range: float, quantization_range: int
) -> np.ndarray:
    """Map ``sum_i w_i q_i`` back to the weighted average of the clipped inputs.

    Args:
        total: integer array, the exact (unwrapped) weighted sum of quantised vectors.
        total_weight: ``sum_i w_i`` > 0.

    Returns:
        float64 array: ``(total / total_weight) * 2r / L - r``.
    """
    if total_weight <= 0:
        raise ValueError(f"total weight must be > 0, got {total_weight}")
    mean_q = np.asarray(total, dtype=np.float64) / total_weight
    return mean_q * (2.0 * clipping_range / quantization_range) - clipping_range


def centered_lift(
    residues: np.ndarray, center: int, bits: int
) -> tuple[np.ndarray, int]:
    """Lift a sum modulo ``2^bits`` to the integer nearest ``center``.

    Without noise the weighted sum of quantised vectors lies in ``[0, W L]`` (``W`` the
    total weight), and ``W L < 2^bits`` makes the residue the sum itself. With
    distributed-DP noise a coordinate can fall below 0 or above ``W L``; it is then
    recovered exactly as long as it stays within ``2^(bits-1)`` of ``center = W L / 2``
    (the lift is the identity on ``[0, W L]`` whenever ``W L < 2^bits``).

    Args:
        residues: int64 array of residues in ``[0, 2^bits)`` (for ``bits = 64``, the
            int64 reinterpretation of the uint64 residues).
        center: the expected middle of the sum, ``W L // 2``.
        bits: 32 or 64.

    Returns:
        ``(values, suspected_wraparounds)``: int64 values; and how many coordinates lie
        farther from ``center`` than halfway between the honest range's edge
        (``center`` away: a noiseless sum lies in ``[0, 2 center]``) and the wrap point
        (``2^(bits-1)`` away), i.e. more than ``center + (2^(bits-1) - center) / 2``.
        An exact sum is never flagged, even when ``2 center`` is close to ``2^bits``;
        noise up to that margin is not flagged either.
    """
    residues = np.asarray(residues, dtype=np.int64)
    if bits == 64:
        offset = (residues.view(np.uint64) - np.uint64(center)).view(np.int64)
    elif bits < 63:
        modulus = 1 << bits
        offset = (residues - center) % modulus
        offset[offset >= modulus // 2] -= modulus
    else:
        raise ValueError(f"bits must be < 63 or 64, got {bits}")
    half = 1 << (bits - 1)
    limit = center + max(0, half - center) // 2
    suspected = int(np.count_nonzero(np.abs(offset) > limit))
    return offset + center, suspected
