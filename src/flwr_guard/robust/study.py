"""A robustness study: train a classifier with each objective, evaluate it, score its
explanations (no Flower imports).

:func:`run_study` is what ``flwr-guard robustness`` and ``benchmarks/robustness.py`` run:
for every objective and seed it trains ``model_fn()`` on ``(x_train, y_train)`` with
:func:`~flwr_guard.robust.objectives.train_robust_epochs`, measures its seconds per step
(the cost ratio is against ``plain`` of the same seed, in the same run), runs
:func:`~flwr_guard.robust.evaluation.evaluate_robustness` on the test set and
:func:`~flwr_guard.robust.attribution_scores.score_attributions` on the first
``attribution_examples`` test images. The controls (the first seed's plain model
behind an input quantisation, attacked directly and through BPDA) check the masking
detector in the same run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_guard.robust.attribution_scores import score_attributions
from flwr_guard.robust.attributions import METHODS
from flwr_guard.robust.evaluation import (
    DEFAULT_EPS,
    AttackSettings,
    evaluate_robustness,
)
from flwr_guard.robust.objectives import RobustObjective, train_robust_epochs
from flwr_guard.robust.transforms import InputQuantization

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPlan:
    """What to train and how hard to attack.

    Attributes:
        objectives: the :class:`RobustObjective` to compare (``plain`` first is best:
            the cost ratios are against it).
        seeds: training seeds.
        epochs, batch_size, learning_rate, momentum: SGD training.
        eps: evaluation radii (L-inf, pixels in [0, 1]).
        attacks: attack strengths (:class:`AttackSettings`).
        attribution_examples: test images the attribution scores use (0 = none).
        controls: also run the masking detector's controls.
        device: ``"cpu"``, ``"cuda"``, ...
    """

    objectives: tuple[RobustObjective, ...] = (
        RobustObjective("plain"), RobustObjective("cure", 0.1, 4.0),
        RobustObjective("scorpio", 0.1, 1.0), RobustObjective("pgd-at", 0.1, steps=5))
    seeds: tuple[int, ...] = (0,)
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 0.1
    momentum: float = 0.9
    eps: tuple[float, ...] = DEFAULT_EPS
    attacks: AttackSettings = field(default_factory=AttackSettings)
    attribution_examples: int = 32
    controls: bool = True
    device: str = "cpu"


def _label(o: RobustObjective) -> str:
    if o.objective == "plain":
        return "plain"
    extra = f", lambda {o.lam:g}" if o.objective in ("cure", "scorpio") else f", {o.steps} steps"
    return f"{o.objective} (eps {o.eps:g}{extra})"


def run_study(
    model_fn: Callable[[], nn.Module],
    x_train: torch.Tensor, y_train: torch.Tensor,
    x_test: torch.Tensor, y_test: torch.Tensor,
    plan: StudyPlan,
    on_model: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Run the study; returns ``(record, trained models by "objective/seed")``.

    ``record`` is JSON-serialisable (see :mod:`flwr_guard.robust.report`); ``on_model``
    is called with each model's entry as soon as it is done (progress output).
    """
    device = torch.device(plan.device)
    x_test, y_test = x_test.to(device), y_test.to(device)
    models: list[dict[str, Any]] = []
    trained: dict[str, nn.Module] = {}
    for seed in plan.seeds:
        plain_step = None
        for objective in plan.objectives:
            torch.manual_seed(seed)
            model = model_fn()
            loader = DataLoader(TensorDataset(x_train, y_train), batch_size=plan.batch_size,
                                shuffle=True, generator=torch.Generator().manual_seed(seed))
            cost = train_robust_epochs(model, loader, objective, plan.epochs, plan.learning_rate,
                                       plan.momentum, device, cpu_threads=plan.attacks.cpu_threads)
            if objective.objective == "plain":
                plain_step = cost.seconds_per_step
            start = time.perf_counter()
            result = evaluate_robustness(model, x_test, y_test, plan.eps, plan.attacks)
            entry: dict[str, Any] = {
                "objective": _label(objective), "config": asdict(objective), "seed": seed,
                **result.to_dict(),
                "train_loss": cost.loss, "seconds_per_step": cost.seconds_per_step,
                "cost_ratio": cost.seconds_per_step / plain_step if plain_step else float("nan"),
            }
            n = min(plan.attribution_examples, x_test.shape[0])
            if n:
                entry["attribution_scores"] = score_attributions(model, x_test[:n], y_test[:n],
                                                                 METHODS, seed=seed)
            entry["evaluation_seconds"] = time.perf_counter() - start
            models.append(entry)
            trained[f"{objective.objective}/{seed}"] = model
            if on_model:
                on_model(entry)
    record: dict[str, Any] = {"settings": {
        "objectives": [asdict(o) for o in plan.objectives], "seeds": list(plan.seeds),
        "epochs": plan.epochs, "batch_size": plan.batch_size, "learning_rate": plan.learning_rate,
        "momentum": plan.momentum, "eps": list(plan.eps), "attacks": asdict(plan.attacks),
        "attribution_examples": plan.attribution_examples, "train_examples": int(x_train.shape[0]),
        "test_examples": int(x_test.shape[0]), "device": plan.device}, "models": models}
    if plan.controls and f"plain/{plan.seeds[0]}" in trained:
        net = trained[f"plain/{plan.seeds[0]}"]
        masked = InputQuantization(net, levels=4)
        ste = InputQuantization(net, levels=4, straight_through=True)
        controls = []
        for label, grad_model in (("quantised input, attacked directly", None),
                                  ("quantised input, attacked through BPDA", ste)):
            r = evaluate_robustness(masked, x_test, y_test, plan.eps, plan.attacks, gradient_model=grad_model)
            controls.append({"control": label, **r.to_dict()})
        record["controls"] = controls
    return record, trained


def attribution_maps(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, dict[str, np.ndarray]]:
    """``{model key: {method: (N, H, W)}}`` (channels summed) for the figures."""
    out = {}
    for key, model in models.items():
        model.eval()
        out[key] = {name: method(model, x, y).sum(dim=1).detach().cpu().numpy()
                    for name, method in METHODS.items()}
    return out
