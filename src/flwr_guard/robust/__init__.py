"""Robust training, evasion attacks, a gradient-masking detector and faithful explanations
(the FGMF source; docs/robustness.md).

Core (no Flower imports), one concept per module: :mod:`attacks` (FGSM, PGD with
restarts, SPSA, Square), :mod:`hvp` (input Hessian-vector products, curvature),
:mod:`objectives` (CURE, SCORPIO-style, PGD-AT; the client training loop),
:mod:`masking` (the detector), :mod:`transforms` (the quantisation control and BPDA),
:mod:`evaluation` (clean / robust accuracy + verdict), :mod:`attributions` (IG,
occlusion, Grad-CAM++, PGCA), :mod:`attribution_scores`, :mod:`sgam`, :mod:`study`,
:mod:`report`. Adapters: :mod:`server_eval` (the ServerApp's evaluation every k
rounds), :mod:`cli` (``flwr-guard robustness``). Telemetry: ``telemetry/robustness.py``.

Every name loads on first use (torch and Captum take seconds to import).
"""

from __future__ import annotations

from flwr_guard.lazy import lazy_getattr

_EXPORTS = {
    "fgsm": "flwr_guard.robust.attacks",
    "pgd": "flwr_guard.robust.attacks",
    "spsa": "flwr_guard.robust.attacks",
    "square": "flwr_guard.robust.attacks",
    "input_hvp": "flwr_guard.robust.hvp",
    "curvature": "flwr_guard.robust.hvp",
    "RobustObjective": "flwr_guard.robust.objectives",
    "RobustTrainingError": "flwr_guard.robust.objectives",
    "train_robust_epochs": "flwr_guard.robust.objectives",
    "detect_masking": "flwr_guard.robust.masking",
    "MaskingVerdict": "flwr_guard.robust.masking",
    "InputQuantization": "flwr_guard.robust.transforms",
    "AttackSettings": "flwr_guard.robust.evaluation",
    "evaluate_robustness": "flwr_guard.robust.evaluation",
    "gradcam_pp": "flwr_guard.robust.attributions",
    "pgca_cells": "flwr_guard.robust.attributions",
    "score_attributions": "flwr_guard.robust.attribution_scores",
    "SGAM": "flwr_guard.robust.sgam",
    "RobustnessEvaluator": "flwr_guard.robust.server_eval",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
