"""Hessian-vector products are exact on a quadratic; curvature regularisers lower curvature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_guard.robust.hvp import curvature, input_hvp
from flwr_guard.robust.objectives import (
    RobustObjective,
    RobustTrainingError,
    check_dpsgd_compatible,
    train_robust_epochs,
)


class Quadratic(nn.Module):
    """Two-class logits ``[1/2 x.A x + b.x, 0]``; its summed CE has a closed-form Hessian."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = nn.Parameter(m + m.T)
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)
        q = 0.5 * (f @ self.A * f).sum(1) + f @ self.b
        return torch.stack([q, torch.zeros_like(q)], dim=1)


@pytest.mark.parametrize("method", ["double-backward", "finite-difference"])
def test_hvp_equals_the_closed_form_hessian_of_a_quadratic_model(method: str) -> None:
    d = 9
    model = Quadratic(d)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    hv = input_hvp(model, x, y, v, method=method, h=1e-4)
    # CE of class c for logits [q, 0]: softplus(-q) (c = 0) or softplus(q) (c = 1); with
    # p = sigmoid(q): d2/dx2 = p(1-p) grad q grad q^T + (p - [c = 0]) A
    A, b = model.A.detach(), model.b.detach()
    for i in range(4):
        f = x[i].flatten()
        q = 0.5 * f @ A @ f + b @ f
        p = torch.sigmoid(q)
        gq = A @ f + b
        H = p * (1 - p) * torch.outer(gq, gq) + (p - (1.0 if y[i] == 0 else 0.0)) * A
        torch.testing.assert_close(hv[i].flatten(), H @ v[i].flatten(), rtol=1e-6, atol=1e-6)


def test_hvp_refuses_mismatched_shapes() -> None:
    model = Quadratic(9)
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        input_hvp(model, x, torch.tensor([0, 1]), x[:1])


def _digits(n: int = 256):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n] / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(data.target[:n])


@pytest.mark.parametrize("objective", ["cure", "scorpio"])
def test_a_short_regularised_run_lowers_the_measured_curvature(objective: str) -> None:
    from flwr_guard.apps.digits.model import DigitsCNN  # the reference architecture

    x, y = _digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    probe_x, probe_y = x[:64], y[:64]
    curv = {}
    for name, obj in (("plain", RobustObjective("plain")),
                      (objective, RobustObjective(objective, eps=0.1, lam=4.0))):
        torch.manual_seed(0)
        model = DigitsCNN()
        train_robust_epochs(model, loader, obj, epochs=3, learning_rate=0.1, momentum=0.9,
                            device=torch.device("cpu"), cpu_threads=1)
        model.eval()
        curv[name] = curvature(model, probe_x, probe_y, iterations=10,
                               generator=torch.Generator().manual_seed(0)).abs().mean().item()
    assert curv[objective] < 0.7 * curv["plain"], curv


def test_pgd_at_trains_on_adversarial_examples() -> None:
    x, y = _digits(64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    obj = RobustObjective("pgd-at", eps=0.1, steps=5)
    torch.manual_seed(0)
    loss = obj.loss(model, x, y)
    assert loss.item() > F.cross_entropy(model(x), y).item()  # the worst case is worse


def test_configuration_errors_name_the_fix() -> None:
    with pytest.raises(RobustTrainingError, match="one of plain, cure"):
        RobustObjective("trades")
    with pytest.raises(RobustTrainingError, match="eps"):
        RobustObjective("cure", eps=0.0)
    cfg = RobustObjective.from_run_config({"robust-objective": "cure", "robust-eps": 0.05,
                                           "robust-lambda": 2.0, "robust-steps": 1})
    assert cfg == RobustObjective("cure", 0.05, 2.0, 1)
    with pytest.raises(RobustTrainingError, match="dp-sgd = false"):
        check_dpsgd_compatible(cfg, dp_sgd=True)
    check_dpsgd_compatible(RobustObjective("plain"), dp_sgd=True)
