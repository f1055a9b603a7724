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
