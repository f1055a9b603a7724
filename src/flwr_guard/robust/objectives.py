"""Robust training objectives: CURE, a SCORPIO-style quadratic bound, PGD-AT (no Flower imports).

A :class:`RobustObjective` turns a batch ``(x, y)`` (``x`` float32 ``(B, C, H, W)`` in
``[0, 1]``, ``y`` int64 ``(B,)``) into a scalar loss to minimise; every variant is the mean
cross-entropy plus (or replaced by) a robustness term, per example ``i``:

- ``"plain"``: ``CE(x_i)``.
- ``"cure"`` — Moosavi-Dezfooli et al., "Robustness via Curvature Regularization, and
  Vice Versa", CVPR 2019, Sec. 4, Eq. (6):
  ``CE(x_i) + lambda * || g(x_i + eps s_i) - g(x_i) ||_2^2`` with ``g`` the input gradient
  of the loss and ``s_i = sign(g(x_i))`` held constant (CURE's ``h z`` with
  ``z = s / ||s||_2`` and ``h = eps ||s||_2``: the finite-difference Hessian-vector product
  along the gradient sign, stepping to the corner of the eps-ball).
- ``"scorpio"`` — SCORPIO-style (after Tsiligkaridis and Roberts, arXiv 2009.04923, 2020:
  minimise the worst case of the second-order model of the adversarial loss):
  ``CE(x_i) + lambda * (g_i . d_i + 1/2 d_i . H_i d_i)`` where ``H_i`` is the input Hessian
  and ``d_i`` the L-infinity maximiser found by ``steps`` fixed-point (Frank-Wolfe) steps
  ``d <- eps * sign(g + H d)`` from ``d = eps * sign(g)``, held constant; with
  ``steps = 1`` the term is ``eps ||g||_1 + 1/2 eps^2 s.H.s``. The products ``H d`` are
  exact (double backward). The paper's own algorithm was not checked here line by line:
  this is the project's reading of its objective, documented in docs/robustness.md.
- ``"pgd-at"`` — Madry et al., ICLR 2018, Eq. (2.1): ``CE(PGD_{eps, steps}(x_i))``
  (the adversarial example from :func:`flwr_guard.robust.attacks.pgd`, one random start).

Curvature objectives need double backward, which Opacus' per-example hooks do not
support: :func:`check_dpsgd_compatible` refuses the combination with DP-SGD.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from flwr_guard.device import cpu_settings
from flwr_guard.errors import FlwrGuardError
from flwr_guard.keys import RunConfig
from flwr_guard.robust.attacks import pgd
from flwr_guard.robust.hvp import input_grad

OBJECTIVES = ("plain", "cure", "scorpio", "pgd-at")


class RobustTrainingError(FlwrGuardError, ValueError):
    """A robust-training option that cannot be honoured as configured."""


@dataclass(frozen=True)
class RobustObjective:
    """Which robust objective a client trains with.

    Attributes:
        objective: one of :data:`OBJECTIVES`.
        eps: L-infinity radius in pixel units (pixels in ``[0, 1]``), ``> 0`` unless plain.
        lam: weight ``lambda >= 0`` of the curvature term (CURE, SCORPIO).
        steps: PGD steps (``pgd-at``) or fixed-point steps (``scorpio``), ``>= 1``.

    Raises:
        RobustTrainingError: for an unknown objective or out-of-range values.
    """

    objective: str = "plain"
    eps: float = 0.1
    lam: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise RobustTrainingError(
                f"robust objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective != "plain" and not 0 < self.eps <= 1:
            raise RobustTrainingError(f"robust eps must be in (0, 1] (pixels in [0, 1]), got {self.eps}")
        if not self.lam >= 0 or self.steps < 1:
            raise RobustTrainingError(f"need lambda >= 0 and steps >= 1, got {self.lam}, {self.steps}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RobustObjective:
        """Read ``robust-objective`` ("plain" if absent), ``robust-eps``,
        ``robust-lambda``, ``robust-steps`` from a Flower run config
        (:class:`flwr_guard.keys.RunConfig`).

        Raises:
            RobustTrainingError: for invalid values.
        """
        return cls(
            objective=str(run_config.get(RunConfig.ROBUST_OBJECTIVE, "plain")),
            eps=float(run_config.get(RunConfig.ROBUST_EPS, 0.1)),
            lam=float(run_config.get(RunConfig.ROBUST_LAMBDA, 1.0)),
            steps=int(run_config.get(RunConfig.ROBUST_STEPS, 1)),
        )

    @property
    def enabled(self) -> bool:
        return self.objective != "plain"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective's mean loss over the batch (a scalar with a graph to the weights)."""
        if self.objective == "plain":
            return F.cross_entropy(model(x), y)
        if self.objective == "pgd-at":
            x_adv = pgd(model, x, y, self.eps, steps=self.steps, restarts=1)
            return F.cross_entropy(model(x_adv), y)
        b = x.shape[0]
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        ce = F.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(ce, [xg], create_graph=True)
        if self.objective == "cure":
            shifted = input_grad(model, (x + self.eps * g.detach().sign()).clamp(0.0, 1.0).detach(),
                                 y, create_graph=True)
            reg = (shifted - g).flatten(1).pow(2).sum(dim=1)
        else:  # scorpio
            d = self.eps * g.detach().sign()
            for _ in range(self.steps - 1):
                (hd,) = torch.autograd.grad((g * d).sum(), [xg], retain_graph=True)
                d = self.eps * (g.detach() + hd).sign()
            (hd,) = torch.autograd.grad((g * d).sum(), [xg], create_graph=True)
            reg = (g * d).flatten(1).sum(dim=1) + 0.5 * (d * hd).flatten(1).sum(dim=1)
        return ce / b + self.lam * reg.mean()


def check_dpsgd_compatible(objective: RobustObjective, dp_sgd: bool) -> None:
    """Refuse robust training together with DP-SGD.

    Opacus computes per-example gradients with hooks that do not support double backward
    (curvature terms), and adversarial examples would be drawn outside its accounting
    (PGD-AT). Neither is implemented here.

    Raises:
        RobustTrainingError: if ``dp_sgd`` and ``objective.enabled``, naming the fix.
    """
    if dp_sgd and objective.enabled:
        raise RobustTrainingError(
            f"robust-objective = {objective.objective!r} cannot be combined with DP-SGD "
            "(Opacus' per-example gradients do not support double backward, and "
            "adversarial examples are not accounted): set dp-sgd = false or "
            "robust-objective = \"plain\""
        )


@dataclass(frozen=True)
class TrainingCost:
    """Wall-clock cost of a training call: ``steps`` optimiser steps in ``seconds``."""

    loss: float
    steps: int
    seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def train_robust_epochs(
    model: nn.Module,
    loader: DataLoader,
    objective: RobustObjective,
    epochs: int,
    learning_rate: float,
    momentum: float,
    device: torch.device,
    cpu_threads: int | None = None,
) -> TrainingCost:
    """Train ``model`` in place with SGD on ``objective``; the last epoch's mean loss,
    the steps taken and the seconds they took (all epochs). ``cpu_threads``: see
    :func:`flwr_guard.device.cpu_settings` (``None`` = leave torch's settings).

    Raises:
        FloatingPointError: if the loss becomes NaN or Inf (lower lambda or the rate).
    """
    with cpu_settings(device, cpu_threads, disable_onednn=cpu_threads is not None):
        return _train(model, loader, objective, epochs, learning_rate, momentum, device)


def _train(model: nn.Module, loader: DataLoader, objective: RobustObjective, epochs: int,
           learning_rate: float, momentum: float, device: torch.device) -> TrainingCost:
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    steps, total, count = 0, 0.0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            if y.shape[0] == 0:
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = objective.loss(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"robust objective {objective.objective!r} gave a non-finite loss; "
                    "lower robust-lambda or the learning rate")
            loss.backward()
            optimizer.step()
            steps += 1
            total += loss.item() * y.shape[0]
            count += y.shape[0]
    return TrainingCost(loss=total / max(count, 1), steps=steps, seconds=time.perf_counter() - start)
