"""The gradient-masking detector: positive control (a quantised input defence), its BPDA
twin, and the negative control (a plainly trained model)."""

from __future__ import annotations

import numpy as np
import pytest
from robust_helpers import digits, trained_cnn

from flwr_guard.robust.evaluation import AttackSettings, evaluate_robustness
from flwr_guard.robust.masking import detect_masking, mcnemar_greater
from flwr_guard.robust.transforms import InputQuantization

# Square is the zeroth-order attack of the controls (SPSA costs ~10x more queries for the
# same effect on this model; it is checked for optimality in test_robust_attacks.py).
SETTINGS = AttackSettings(attacks=("fgsm", "pgd", "square"), pgd_steps=20, pgd_restarts=1,
                          square_queries=200, zeroth_order_examples=80)
EPS = (0.1, 0.2)


def _eval(model, gradient_model=None):
    x, y = digits("test")
    return evaluate_robustness(model, x[:80], y[:80], EPS, SETTINGS, gradient_model=gradient_model)


def test_positive_control_a_quantised_input_triggers_the_detector_and_bpda_does_not() -> None:
    net = trained_cnn()
    masked = InputQuantization(net, levels=4)
    result = _eval(masked)
    assert result.verdict.suspected, result.to_dict()
    names = {c.name for c in result.verdict.checks if c.fired}
    assert "zeroth-order-beats-first-order" in names
    # the same defended model, attacked through the straight-through estimator (BPDA)
    bpda = _eval(masked, gradient_model=InputQuantization(net, levels=4, straight_through=True))
    assert not bpda.verdict.suspected, bpda.verdict.fired
    assert bpda.robust_accuracy["pgd"][0.2] < result.robust_accuracy["pgd"][0.2]
    assert bpda.robust_accuracy["pgd"][1.0] == 0.0


def test_negative_control_a_plainly_trained_model_is_not_flagged() -> None:
    result = _eval(trained_cnn())
    assert result.clean_accuracy > 0.9
    assert not result.verdict.suspected, result.verdict.fired
    assert result.robust_accuracy["pgd"][1.0] == 0.0
    # PGD is the strongest attack here, and stronger at a larger eps
    assert result.robust_accuracy["pgd"][0.2] <= result.robust_accuracy["pgd"][0.1]


def test_mcnemar_is_paired_and_one_sided() -> None:
    a = np.array([1] * 30 + [0] * 70, bool)
    b = np.zeros(100, bool)
    assert mcnemar_greater(a, b)[2] < 1e-8
    assert mcnemar_greater(b, a)[2] == 1.0
    # the same success rates, but on different examples: not significant either way
    c = np.roll(a, 50)
    assert mcnemar_greater(a, c)[2] > 0.5


def test_detector_refuses_unpaired_results() -> None:
    with pytest.raises(ValueError, match="same examples"):
        detect_masking({("pgd", 0.1): np.zeros(5, bool), ("square", 0.1): np.zeros(4, bool)})
    with pytest.raises(ValueError, match="PGD"):
        detect_masking({("square", 0.1): np.zeros(5, bool)})
