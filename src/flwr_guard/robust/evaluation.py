"""Robustness evaluation: clean and robust accuracy per attack and eps, and the masking
verdict on the same examples (no Flower imports).

:func:`evaluate_robustness` attacks a classifier with every attack of
:mod:`flwr_guard.robust.attacks` at each eps, plus an unbounded PGD (eps = 1), and runs
:func:`flwr_guard.robust.masking.detect_masking` over the paired results. The
zeroth-order attacks cost thousands of queries per example, so they run on the first
``zeroth_order_examples`` examples only; the detector compares every attack on that
common subset (first-order accuracies are reported on all examples).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flwr_guard.device import cpu_settings
from flwr_guard.keys import ServerMetrics
from flwr_guard.robust.attacks import fgsm, pgd, spsa, square
from flwr_guard.robust.masking import UNBOUNDED_EPS, MaskingVerdict, detect_masking

DEFAULT_EPS = (0.05, 0.1, 0.2)
ATTACK_NAMES = ("fgsm", "pgd", "spsa", "square")


@dataclass(frozen=True)
class AttackSettings:
    """Strength of each attack (defaults: PGD-40 with 2 restarts, SPSA 40 x 32 probe pairs,
    Square 500 queries), the subsample for the zeroth-order attacks, and the torch
    threads on CPU (``cpu_threads``, oneDNN off; ``None`` = leave as is; see
    :func:`flwr_guard.device.cpu_settings`).

    Raises:
        ValueError: for an unknown attack name or a non-positive count.
    """

    attacks: tuple[str, ...] = ATTACK_NAMES
    pgd_steps: int = 40
    pgd_restarts: int = 2
    spsa_steps: int = 40
    spsa_samples: int = 32
    square_queries: int = 500
    zeroth_order_examples: int = 100
    batch_size: int = 128
    seed: int = 0
    cpu_threads: int | None = 1

    def __post_init__(self) -> None:
        unknown = set(self.attacks) - set(ATTACK_NAMES)
        if unknown or "pgd" not in self.attacks:
            raise ValueError(f"attacks must include pgd and be among {ATTACK_NAMES}, got {self.attacks}")
        counts = (self.pgd_steps, self.pgd_restarts, self.spsa_steps, self.spsa_samples,
                  self.square_queries, self.zeroth_order_examples, self.batch_size)
        if min(counts) < 1:
            raise ValueError(f"attack settings must be >= 1, got {counts}")


@dataclass
class RobustnessResult:
    """What :func:`evaluate_robustness` measured.

    Attributes:
        clean_accuracy: accuracy in ``[0, 1]`` on all examples.
        robust_accuracy: ``{attack: {eps: accuracy in [0, 1]}}`` (eps 1 = unbounded PGD).
        examples: ``{attack: examples attacked}``.
        verdict: the masking detector's result on the common subset.
        seconds: ``{attack: wall-clock seconds, all eps}``.
    """

    clean_accuracy: float
    robust_accuracy: dict[str, dict[float, float]]
    examples: dict[str, int]
    verdict: MaskingVerdict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": {a: {str(e): v for e, v in r.items()} for a, r in self.robust_accuracy.items()},
            "examples": self.examples,
            "masking": self.verdict.to_dict(),
            "seconds": self.seconds,
        }

    def flat_metrics(self) -> dict[str, float]:
        """``{"robust-acc-<attack>-<eps>": acc, "robust-acc-none-0": clean acc,
        "robust-masking-suspected": 0/1}`` (the keys a Flower MetricRecord carries and
        :mod:`flwr_guard.telemetry.robustness` reads; see docs/robustness.md)."""
        out = {ServerMetrics.ROBUST_ACCURACY_CLEAN: self.clean_accuracy,
               ServerMetrics.ROBUST_MASKING_SUSPECTED: float(self.verdict.suspected)}
        for attack, by_eps in self.robust_accuracy.items():
            for eps, acc in by_eps.items():
                out[ServerMetrics.robust_accuracy(attack, eps)] = acc
        return out


def _at_radius(run: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], eps: float,
               x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return run(x, y, eps)


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch], y[i:i + batch]) for i in range(0, x.shape[0], batch)])


def evaluate_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Sequence[float] = DEFAULT_EPS,
    settings: AttackSettings | None = None,
    gradient_model: nn.Module | None = None,
    alpha: float = 0.01,
) -> RobustnessResult:
    """Clean accuracy, robust accuracy per attack and eps, and the masking verdict.

    Args:
        model: the classifier (set to eval mode here); ``x`` float32 ``(N, C, H, W)`` in
            ``[0, 1]``, ``y`` int64 ``(N,)``, on the model's device.
        eps: L-infinity radii in pixel units, each in ``(0, 1)``.
        gradient_model: what the first-order attacks differentiate (e.g. a BPDA
            surrogate with the same forward pass); ``model`` by default. Success is
            always judged on ``model``.
        alpha: significance level of the detector's paired tests.

    Raises:
        ValueError: for empty or mismatched inputs, NaN/Inf pixels or eps outside (0, 1).
    """
    settings = settings or AttackSettings()
    with cpu_settings(x.device, settings.cpu_threads,
                      disable_onednn=settings.cpu_threads is not None):
        return _evaluate(model, x, y, eps, settings, gradient_model, alpha)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
              settings: AttackSettings, gradient_model: nn.Module | None, alpha: float
              ) -> RobustnessResult:
    if x.shape[0] == 0 or y.shape != (x.shape[0],):
        raise ValueError(f"need N >= 1 images with N labels, got {tuple(x.shape)}, {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN or Inf")
    if not eps or any(not 0 < e < 1 for e in eps):
        raise ValueError(f"every eps must be in (0, 1), got {list(eps)}")
    model.eval()
    grad_model = gradient_model.eval() if gradient_model is not None else model
    gen = torch.Generator().manual_seed(settings.seed)
    n_zo = min(settings.zeroth_order_examples, x.shape[0])
    with torch.no_grad():
        def predict(xs: torch.Tensor) -> torch.Tensor:
            return _batched(lambda a, b: model(a).argmax(1), xs, y[: xs.shape[0]], settings.batch_size)

        clean = (predict(x) == y).cpu().numpy()
    runs: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
        "fgsm": lambda a, b, e: fgsm(grad_model, a, b, e),
        "pgd": lambda a, b, e: pgd(grad_model, a, b, e, steps=settings.pgd_steps,
                                   restarts=settings.pgd_restarts, generator=gen),
        "spsa": lambda a, b, e: spsa(model, a, b, e, steps=settings.spsa_steps,
                                     samples=settings.spsa_samples, generator=gen),
        "square": lambda a, b, e: square(model, a, b, e, queries=settings.square_queries, generator=gen),
    }
    fooled: dict[tuple[str, float], np.ndarray] = {}
    robust: dict[str, dict[float, float]] = {}
    examples: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for attack in settings.attacks:
        n = n_zo if attack in ("spsa", "square") else x.shape[0]
        radii = list(eps) + ([UNBOUNDED_EPS] if attack == "pgd" else [])
        start = time.perf_counter()
        robust[attack], examples[attack] = {}, n
        run = runs[attack]
        for e in radii:
            x_adv = _batched(functools.partial(_at_radius, run, e), x[:n], y[:n], settings.batch_size)
            with torch.no_grad():
                correct = (predict(x_adv) == y[:n]).cpu().numpy()
            robust[attack][e] = float(correct.mean())
            fooled[(attack, e)] = ~correct[:n_zo]
        seconds[attack] = time.perf_counter() - start
    verdict = detect_masking(fooled, alpha=alpha)
    return RobustnessResult(float(clean.mean()), robust, examples, verdict, seconds)
