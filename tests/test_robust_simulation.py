"""Robust training and the server's robustness evaluation inside a real Flower simulation."""

from __future__ import annotations

import pytest
from conftest import alive

from flwr_guard.demo import DemoOptions, run_demo

pytestmark = pytest.mark.simulation


def test_robust_training_and_evaluation_run_in_a_flower_simulation(tmp_path) -> None:
    # 2 nodes, 1 round: the clients train with CURE (no DP-SGD: refused together), the
    # ServerApp evaluates the global model under FGSM, PGD, SPSA and Square after the
    # round and runs the masking detector; the metrics reach the round's record.
    result = run_demo(DemoOptions(
        nodes=2, rounds=1, simulation=True, prometheus=False, workdir=tmp_path / "work",
        run_config={"dp-sgd": False, "audit": False, "secagg": False, "fraction-evaluate": 0.0,
                    "local-epochs": 1, "batch-size": 32, "learning-rate": 0.05,
                    "robust-objective": "cure", "robust-eps": 0.1, "robust-lambda": 1.0,
                    "robust-eval-every": 1, "robust-eval-examples": 40,
                    "robust-eval-pgd-steps": 10, "robust-eval-zo-examples": 16,
                    "robust-eval-attribution-examples": 4}))
    assert result.success, result.error
    initial, first = result.rounds
    assert "robust-acc-pgd-0.1" not in initial["server"]  # round 0: not due
    server = first["server"]
    for attack in ("fgsm", "pgd", "spsa", "square"):
        for eps in ("0.05", "0.1", "0.2"):
            assert 0.0 <= server[f"robust-acc-{attack}-{eps}"] <= 1.0
    assert server["robust-acc-pgd-1"] == 0.0  # unbounded PGD breaks every example
    assert server["robust-acc-pgd-0.2"] <= server["robust-acc-none-0"]
    assert server["robust-masking-suspected"] in (0.0, 1.0)
    assert "robust-attr-pgca-deletion_auc" in server
    assert first["train"]["robust-train-seconds-per-step"] > 0
    assert alive(result.processes) == []
