"""Scores for reconstructed vectors (tabular rows, embeddings; also computed for images).

Per victim ``x`` and its paired reconstruction ``x̂`` (pairing: :func:`scores.match`):

- relative L2 error ``‖x̂ − x‖₂ / ‖x‖₂`` in the data's own units (``inf`` for ``x = 0``);
- cosine similarity ``⟨x̂, x⟩ / (‖x̂‖ ‖x‖)`` in the data's units (torchmetrics
  ``cosine_similarity``);
- recovered fraction: the share of features with ``|û_j − u_j| <= tol`` where ``u`` is
  the feature scaled to ``[0, 1]`` by the client's per-feature range
  (:mod:`flwr_guard.audit.inputs`), default ``tol = 0.05`` (within 5 % of the feature's
  range: e.g. an age within 3 years on a 20–80 range).

For images the "units" are pixels in ``[0, 1]``, so ``u = x``.
"""

from __future__ import annotations

import torch
from torchmetrics.functional import cosine_similarity

FEATURE_TOLERANCE = 0.05


def relative_l2_error(estimates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``‖x̂ − x‖ / ‖x‖`` per sample: ``(N, ...)`` → ``(N,)`` float32."""
    diff = (estimates.double() - references.double()).flatten(1).norm(dim=1)
    ref = references.double().flatten(1).norm(dim=1)
    out = torch.where(ref > 0, diff / ref.clamp_min(1e-300), torch.where(
        diff > 0, torch.full_like(diff, float("inf")), torch.zeros_like(diff)))
    return out.float()


def cosine(estimates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per sample: ``(N, ...)`` → ``(N,)`` in ``[-1, 1]``."""
    values = cosine_similarity(estimates.double().flatten(1), references.double().flatten(1),
                               reduction="none")
    return values.clamp(-1.0, 1.0).float()  # rounding can step past 1


def recovered_fraction(estimates_unit: torch.Tensor, references_unit: torch.Tensor,
                       tolerance: float = FEATURE_TOLERANCE) -> torch.Tensor:
    """Share of features within ``tolerance`` (in ``[0, 1]``-scaled units) per sample:
    ``(N, ...)`` → ``(N,)`` in ``[0, 1]``.

    Raises:
        ValueError: for a tolerance outside ``(0, 1]``.
    """
    if not 0.0 < tolerance <= 1.0:
        raise ValueError(f"tolerance must be in (0, 1], got {tolerance}")
    close = (estimates_unit.float() - references_unit.float()).abs() <= tolerance
    return close.flatten(1).float().mean(dim=1)
