"""SGAM is a module with its mask available; it learns to predict the classifier's saliency."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from robust_helpers import digits

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.robust.sgam import SGAM


def test_sgam_masks_what_it_predicts_as_salient_and_exposes_the_mask() -> None:
    torch.manual_seed(0)
    x, y = digits("train")
    x, y = x[:256], y[:256]
    sgam = SGAM(DigitsCNN(), strength=0.8)
    before = sgam.saliency_loss(x, y).item()
    opt = torch.optim.Adam(sgam.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        (F.cross_entropy(sgam(x), y) + sgam.saliency_loss(x, y)).backward()
        opt.step()
    assert sgam.saliency_loss(x, y).item() < before
    out = sgam(x[:4])
    assert out.shape == (4, 10)
    m = sgam.last_mask
    assert m.shape == (4, 1, 8, 8) and m.min() >= 0.2 - 1e-6 and m.max() <= 1.0
    hard = SGAM(sgam.model, mode="hard", hard_fraction=0.25)
    hard.attention.load_state_dict(sgam.attention.state_dict())
    hard(x[:4])
    assert set(hard.last_mask.unique().tolist()) <= {0.0, 1.0}
    assert (hard.last_mask == 0).flatten(1).sum(1).tolist() == [16] * 4
    # the classifier is the last submodule: the audit's label inference finds its Linear
    assert list(hard.modules())[-1] is sgam.model.classifier[-1]


def test_sgam_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="mode"):
        SGAM(DigitsCNN(), mode="medium")
