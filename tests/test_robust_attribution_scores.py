"""Attribution scores separate faithful from unfaithful maps."""

from __future__ import annotations

import math

import torch
from robust_helpers import digits, trained_cnn
from torch import nn

from flwr_guard.robust.attribution_scores import (
    SCORES,
    deletion_insertion,
    infidelity_score,
    randomisation_spearman,
    score_attributions,
)
from flwr_guard.robust.attributions import METHODS, ig_map


def test_deletion_and_insertion_prefer_the_faithful_map_to_its_reverse() -> None:
    model = trained_cnn()
    x, y = digits("test")
    x, y = x[:32], y[:32]
    good = ig_map(model, x, y)
    d_good, i_good = deletion_insertion(model, x, y, good)
    d_bad, i_bad = deletion_insertion(model, x, y, -good)
    assert d_good.mean() < d_bad.mean() - 0.2 and i_good.mean() > i_bad.mean() + 0.2


def test_infidelity_is_zero_for_the_gradient_of_a_linear_model() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    grad = model[1].weight.detach()[y].reshape(4, 1, 8, 8)  # f(x) - f(x - I) = I . w exactly
    assert infidelity_score(model, x, y, grad).max() < 1e-6
    assert infidelity_score(model, x, y, torch.rand_like(x)).min() > 1e-3


def test_randomisation_check_flags_a_map_that_ignores_the_model() -> None:
    model = trained_cnn()
    x, y = digits("test")
    x, y = x[:16], y[:16]
    def edge(m, inp, t):
        return inp.clone()

    assert randomisation_spearman(edge, model, x, y, edge(model, x, y)).min() > 0.999
    # Grad-CAM++ depends on the weights; IG from a black baseline is dominated by the
    # input on digits (zero background: zero attribution for any model), ~0.9 measured
    gradcam = METHODS["gradcam++"]
    assert randomisation_spearman(gradcam, model, x, y, gradcam(model, x, y)).mean() < 0.3
    assert randomisation_spearman(ig_map, model, x, y, ig_map(model, x, y)).mean() < 0.999


def test_every_method_gets_every_score() -> None:
    x, y = digits("test")
    scores = score_attributions(trained_cnn(), x[:8], y[:8])
    assert set(scores) == set(METHODS)
    for name, s in scores.items():
        assert set(s) == set(SCORES) and all(math.isfinite(v) for v in s.values()), name
