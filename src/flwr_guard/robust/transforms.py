"""A non-differentiable input defence and its straight-through twin (no Flower imports).

:class:`InputQuantization` rounds pixels to ``levels`` values before the wrapped model —
a "defence" whose gradient is zero almost everywhere (``torch.round``), i.e. shattered
gradients in the sense of Athalye, Carlini and Wagner, "Obfuscated Gradients Give a False
Sense of Security", ICML 2018, Sec. 4.1. With ``straight_through=True`` the forward pass is
identical but the backward pass treats the rounding as the identity: BPDA (same paper,
Sec. 4.1.1), the attack that sees through it. The pair is the positive control of the
gradient-masking detector (:mod:`flwr_guard.robust.masking`).
"""

from __future__ import annotations

import torch
from torch import nn


class InputQuantization(nn.Module):
    """``model(round(x * (levels - 1)) / (levels - 1))`` for ``x`` in ``[0, 1]``.

    Args:
        model: the classifier behind the transform.
        levels: number of pixel values kept (>= 2).
        straight_through: identity gradient (BPDA) instead of the true, zero one.

    Raises:
        ValueError: for ``levels < 2``.
    """

    def __init__(self, model: nn.Module, levels: int = 4, straight_through: bool = False) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.model, self.levels, self.straight_through = model, levels, straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.levels - 1
        q = torch.round(x.clamp(0.0, 1.0) * k) / k
        if self.straight_through:
            q = x + (q - x).detach()
        return self.model(q)
