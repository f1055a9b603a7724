"""SGAM: saliency-guided adaptive masking, as a module in front of a classifier
(no Flower imports).

The source's idea: a small attention network predicts which input pixels are salient
and masks them before the classifier, "to protect them from gradient leakage". This
module builds it so that the claim can be tested (docs/robustness.md, the SGAM leakage
experiment with the gradient-inversion audit); nothing in the project relies on it as
a protection. Why the claim is doubtful: the attention network itself sees the raw
input and its gradients are shared with the server like every other weight; a soft
mask the server knows is invertible; a hard mask is gradient masking.

Forward: ``s = sigmoid(attention(x))`` ``(B, 1, H, W)`` in ``[0, 1]`` (predicted
saliency); ``mask = 1 - strength * s`` (``"soft"``) or ``mask = 0`` on the
``hard_fraction`` most salient pixels and 1 elsewhere (``"hard"``, a constant in the
backward pass); output ``model(x * mask)``. :attr:`SGAM.last_mask` holds the last mask
``(B, 1, H, W)`` for plots. :meth:`SGAM.saliency_loss` trains the attention network to
predict the classifier's own saliency (the normalised absolute input gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SGAM(nn.Module):
    """Saliency-guided adaptive masking in front of ``model``.

    Args:
        model: the classifier (input ``(B, C, H, W)``); it stays the last submodule, so
            the network still ends in the classifier's last layer.
        channels: input channels ``C``.
        hidden: channels of the attention network's hidden layer.
        strength: how much of a salient pixel the soft mask removes, in ``[0, 1]``.
        mode: ``"soft"`` or ``"hard"``.
        hard_fraction: share of pixels zeroed in hard mode, in ``(0, 1)``.

    Raises:
        ValueError: for an unknown mode or out-of-range strength / fraction.
    """

    def __init__(self, model: nn.Module, channels: int = 1, hidden: int = 8, strength: float = 0.8,
                 mode: str = "soft", hard_fraction: float = 0.25) -> None:
        super().__init__()
        if mode not in ("soft", "hard") or not 0 <= strength <= 1 or not 0 < hard_fraction < 1:
            raise ValueError(f"need mode soft/hard, strength in [0, 1], hard_fraction in (0, 1); "
                             f"got {mode!r}, {strength}, {hard_fraction}")
        self.attention = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 1, 3, padding=1))
        self.model = model
        self.strength, self.mode, self.hard_fraction = strength, mode, hard_fraction
        self.last_mask: torch.Tensor | None = None

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted saliency ``(B, 1, H, W)`` in ``[0, 1]``."""
        return torch.sigmoid(self.attention(x))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        s = self.saliency(x)
        if self.mode == "soft":
            return 1.0 - self.strength * s
        k = max(1, int(self.hard_fraction * s[0].numel()))
        threshold = s.flatten(1).topk(k, dim=1).values[:, -1:, None, None]
        return (s < threshold).to(x.dtype).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask(x)
        self.last_mask = m.detach()
        return self.model(x * m)

    def saliency_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """BCE between the predicted saliency and the classifier's normalised ``|grad_x CE|``
        (channels summed, divided by its per-image maximum; a detached target)."""
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(self.model(xg), y, reduction="sum"), [xg])
        target = g.abs().sum(dim=1, keepdim=True)
        target = (target / target.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None, None]).detach()
        return F.binary_cross_entropy(self.saliency(x), target)
