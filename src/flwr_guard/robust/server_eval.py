"""The server's robustness evaluation every k rounds (no Flower imports; the reference
app's ServerApp calls it from its ``evaluate_fn``).

:class:`RobustnessEvaluator` runs :func:`~flwr_guard.robust.evaluation.evaluate_robustness`
(and, optionally, :func:`~flwr_guard.robust.attribution_scores.score_attributions`) on
the first ``examples`` held-out images in rounds ``k, 2k, ...`` and returns flat metrics
for the round's MetricRecord (keys in :meth:`RobustnessResult.flat_metrics`, plus
``robust-attr-<method>-<score>`` and ``robust-eval-seconds``). Run-config keys:
``robust-eval-every`` (k; 0 = never), ``robust-eval-examples``, ``robust-eval-eps``
(comma-separated), ``robust-eval-pgd-steps``, ``robust-eval-attribution-examples``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flwr_guard.keys import RunConfig, ServerMetrics
from flwr_guard.robust.attribution_scores import score_attributions
from flwr_guard.robust.evaluation import AttackSettings, evaluate_robustness


@dataclass(frozen=True)
class RobustnessEvaluator:
    """Robustness evaluation on held-out data in every ``every``-th round.

    Attributes:
        every: evaluate in rounds divisible by ``every`` (0 = never).
        examples: held-out images attacked (the first ones).
        eps: L-infinity radii (pixels in [0, 1]).
        settings: attack strengths (zeroth-order attacks on ``min(examples,
            settings.zeroth_order_examples)`` images).
        attribution_examples: images for the attribution scores (0 = none).

    Raises:
        ValueError: for negative ``every``, ``examples < 1`` or bad eps.
    """

    every: int = 0
    examples: int = 100
    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    settings: AttackSettings = field(default_factory=AttackSettings)
    attribution_examples: int = 0

    def __post_init__(self) -> None:
        if self.every < 0 or self.examples < 1 or self.attribution_examples < 0:
            raise ValueError(f"need robust-eval-every >= 0, robust-eval-examples >= 1, got "
                             f"{self.every}, {self.examples}")
        if not self.eps or any(not 0 < e < 1 for e in self.eps):
            raise ValueError(f"robust-eval-eps must be values in (0, 1), got {self.eps}")

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RobustnessEvaluator:
        eps_text = str(cfg.get(RunConfig.ROBUST_EVAL_EPS, "0.05,0.1,0.2"))
        eps = tuple(float(e) for e in eps_text.split(",") if e.strip())
        return cls(
            every=int(cfg.get(RunConfig.ROBUST_EVAL_EVERY, 0)),
            examples=int(cfg.get(RunConfig.ROBUST_EVAL_EXAMPLES, 100)),
            eps=eps,
            settings=AttackSettings(pgd_steps=int(cfg.get(RunConfig.ROBUST_EVAL_PGD_STEPS, 40)),
                                    zeroth_order_examples=int(cfg.get(RunConfig.ROBUST_EVAL_ZO_EXAMPLES, 50))),
            attribution_examples=int(cfg.get(RunConfig.ROBUST_EVAL_ATTRIBUTION_EXAMPLES, 0)),
        )

    def due(self, server_round: int) -> bool:
        return self.every > 0 and server_round > 0 and server_round % self.every == 0

    def __call__(self, server_round: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> dict[str, float]:
        """Flat metrics of this round's evaluation (``{}`` when the round is not due)."""
        if not self.due(server_round):
            return {}
        start = time.perf_counter()
        n = min(self.examples, x.shape[0])
        result = evaluate_robustness(model, x[:n], y[:n], self.eps, self.settings)
        out = result.flat_metrics()
        if self.attribution_examples:
            m = min(self.attribution_examples, n)
            for method, scores in score_attributions(model, x[:m], y[:m]).items():
                for score, value in scores.items():
                    out[ServerMetrics.robust_attribution(method, score)] = value
        out[ServerMetrics.ROBUST_EVAL_SECONDS] = time.perf_counter() - start
        return out
