"""The DLG-style LeNet: the second architecture the audit runs on.

Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019, Sec. 4 and the authors' code
(``mit-han-lab/dlg``, ``models/vision.py``): three 5x5 convolutions with sigmoid
activations (no pooling) and one linear layer, with every weight and bias drawn from
``U(-0.5, 0.5)``. Smooth activations and this initialisation are what make L-BFGS
gradient matching converge; the audit uses it as the architecture on which an
unprotected update is known to leak.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_out(size: int, stride: int) -> int:
    # 5x5 kernel, padding 2.
    return (size - 1) // stride + 1


class SigmoidLeNet(nn.Module):
    """LeNet of DLG for ``channels x image_size x image_size`` inputs.

    Input: float32 ``(B, channels, image_size, image_size)``; output ``(B, num_classes)``
    logits. Layers: conv 5x5/2 → sigmoid → conv 5x5/2 → sigmoid → conv 5x5/1 →
    sigmoid → linear. At 28x28 (1 channel, 10 classes) it has 13,426 parameters.

    Args:
        dlg_init: draw every parameter from ``U(-0.5, 0.5)`` as DLG does (seeded by
            ``torch``'s global generator, or by ``generator`` when given).

    Raises:
        ValueError: for ``image_size < 4`` or non-positive sizes.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 28,
        channels: int = 1,
        width: int = 12,
        dlg_init: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if image_size < 4 or num_classes < 1 or channels < 1 or width < 1:
            raise ValueError(
                f"need image_size >= 4 and positive sizes, got image_size={image_size}, "
                f"num_classes={num_classes}, channels={channels}, width={width}"
            )
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = _conv_out(_conv_out(image_size, 2), 2)
        self.fc = nn.Linear(width * side * side, num_classes)
        if dlg_init:
            self.reset_dlg(generator)

    @torch.no_grad()
    def reset_dlg(self, generator: torch.Generator | None = None) -> None:
        """Draw every weight and bias from ``U(-0.5, 0.5)`` (DLG's ``weights_init``)."""
        for param in self.parameters():
            param.uniform_(-0.5, 0.5, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))
