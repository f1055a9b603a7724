"""Gradient-matching distances and the total-variation image prior.

- L2 distance: DLG (Zhu et al. 2019, Eq. 4), ``Σ_l ‖u_l − u*_l‖²`` summed over every
  parameter tensor.
- Cosine distance: Inverting Gradients (Geiping et al. 2020, Eq. 4),
  ``1 − ⟨u, u*⟩ / (‖u‖ ‖u*‖)`` over the concatenation of every tensor. It ignores the
  update's scale, so it still matches after clipping.
- Total variation: the anisotropic TV of Geiping et al. 2020 (Sec. 4): mean absolute
  difference of neighbouring pixels, horizontally plus vertically.
"""

from __future__ import annotations

from typing import cast

import torch


def l2_distance(simulated: list[torch.Tensor], observed: list[torch.Tensor]) -> torch.Tensor:
    """``Σ ‖s − o‖²`` over paired tensors (scalar)."""
    return cast(torch.Tensor, sum(((s - o) ** 2).sum() for s, o in zip(simulated, observed, strict=True)))


def cosine_distance(
    simulated: list[torch.Tensor], observed: list[torch.Tensor], eps: float = 1e-12
) -> torch.Tensor:
    """``1 − cos(s, o)`` of the concatenated tensors (scalar in ``[0, 2]``)."""
    dot = sum((s * o).sum() for s, o in zip(simulated, observed, strict=True))
    s_norm = torch.sqrt(torch.stack([(s * s).sum() for s in simulated]).sum())
    o_norm = torch.sqrt(torch.stack([(o * o).sum() for o in observed]).sum())
    return 1.0 - dot / (s_norm * o_norm + eps)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of ``(B, C, H, W)`` images (scalar, mean over pixels);
    a direction of size 1 (a ``1 x W`` row) contributes 0."""
    zero = images.new_zeros(())
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean() if images.shape[-1] > 1 else zero
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean() if images.shape[-2] > 1 else zero
    return dx + dy
