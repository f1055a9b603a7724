"""Every evasion attack reaches the exact optimum on a linear model.

On a two-class linear model ``z = W x + b`` the margin ``(w_0 - w_1) . x + (b_0 - b_1)``
is minimised over the L-infinity ball of radius eps (inside [0, 1]) by
``x* = x - eps * sign(w_0 - w_1)``, with value ``margin(x) - eps * ||w_0 - w_1||_1``.
The bias keeps every example correctly classified even at the optimum, so no attack
stops early: each must find the corner itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flwr_guard.robust.attacks import ATTACKS, fgsm, margin, pgd, spsa, square

EPS = 0.1


def linear_problem(seed: int = 0, side: int = 4, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(side * side, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, side * side, generator=g))
        model[1].bias.copy_(torch.tensor([8.0, 0.0]))
    x = 0.3 + 0.4 * torch.rand(batch, 1, side, side, generator=g)  # the ball stays in [0, 1]
    y = torch.zeros(batch, dtype=torch.long)
    w = (model[1].weight[0] - model[1].weight[1]).detach().reshape(1, 1, side, side)
    optimum = x - EPS * w.sign()
    return model, x, y, optimum


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_reaches_the_optimal_linf_perturbation_of_a_linear_model(name: str) -> None:
    model, x, y, optimum = linear_problem()
    g = torch.Generator().manual_seed(1)
    kwargs = {"fgsm": {}, "pgd": {"steps": 40, "restarts": 2, "generator": g},
              "spsa": {"steps": 100, "samples": 32, "learning_rate": 0.02, "generator": g},
              "square": {"queries": 600, "generator": g}}[name]
    x_adv = ATTACKS[name](model, x, y, EPS, **kwargs)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        reached, best, clean = margin(model(x_adv), y), margin(model(optimum), y), margin(model(x), y)
    # the optimum is a lower bound no attack may beat
    assert (reached >= best - 1e-4).all()
    if name in ("fgsm", "pgd"):  # first order on a linear model: exactly the corner
        torch.testing.assert_close(x_adv, optimum, atol=1e-6, rtol=0)
    else:  # zeroth order: at least 99% of the optimal margin drop on every example
        assert ((clean - reached) >= 0.99 * (clean - best)).all(), (clean - reached) / (clean - best)


def test_attacks_flip_a_linear_model_once_the_budget_allows() -> None:
    model, x, y, _ = linear_problem()
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.3, 0.0]))
    g = torch.Generator().manual_seed(2)
    for attack in (fgsm, pgd, spsa, square):
        x_adv = attack(model, x, y, 0.3, generator=g) if attack is not fgsm else attack(model, x, y, 0.3)
        assert (model(x_adv).argmax(1) != y).all(), attack.__name__


def test_attacks_refuse_bad_input() -> None:
    model, x, y, _ = linear_problem()
    with pytest.raises(ValueError, match="NaN"):
        pgd(model, x.clone().fill_(float("nan")), y, EPS)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        spsa(model, x, y[:3], EPS)
    with pytest.raises(ValueError, match="square needs"):
        square(model, x.flatten(1), y, EPS)
