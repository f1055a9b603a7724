"""A small CNN for 8x8 digits that Opacus accepts (GroupNorm, no BatchNorm): the
reference app's model, also the default victim of the audit sweep and the robustness
study."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3x3 conv blocks with GroupNorm, max-pooling and two linear layers.

    Input: float32 ``(B, 1, 8, 8)`` in ``[0, 1]``; output: ``(B, num_classes)`` logits.
    GroupNorm instead of BatchNorm keeps every example independent, which per-example
    gradients (Opacus, DP-SGD) need. About 38k parameters.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 32 * (image_size // 2) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
