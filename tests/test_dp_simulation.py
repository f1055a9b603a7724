"""DP-SGD, update clipping inside SecAgg+, and SecAggPlus(DPFedAvg(FedAvg)) with a
budget, inside a real Flower simulation."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES, alive
from flwr_guard.dp.accounting import compute_epsilon
from flwr_guard.dp.strategy import DPFedAvg
from flwr_guard.demo import DemoOptions, run_demo

pytestmark = pytest.mark.simulation

NODES, ROUNDS, Z, DELTA = 3, 3, 0.8, 1e-3


def test_dpsgd_and_dpfedavg_in_simulation_stop_at_the_budget(tmp_path) -> None:
    # Every node takes part in every round (q = 1): the budget fits 2 rounds, not 3.
    eps2, eps3 = (compute_epsilon(Z, 1.0, t, DELTA) for t in (2, 3))
    max_epsilon = (eps2 + eps3) / 2
    result_file, checkpoint = tmp_path / "result.json", tmp_path / "privacy.json"
    result = run_demo(
        DemoOptions(
            nodes=NODES, rounds=ROUNDS, simulation=True, app_dir=FIXTURES / "dp_app",
            run_config={
                "result-file": str(result_file), "dp-checkpoint": str(checkpoint),
                "dp-max-epsilon": max_epsilon, "dp-noise-multiplier": Z, "dp-delta": DELTA,
            },
        )
    )
    assert result.success, result.error
    assert alive(result.processes) == []
    out = json.loads(result_file.read_text())

    # The server ran 2 rounds, refused the 3rd, said why and kept the round-2 model.
    assert out["trained-rounds"] == [1, 2]
    assert "privacy budget exhausted: round 3 not started" in out["stopped-reason"]
    assert "model of round 2 is kept" in out["stopped-reason"]
    assert out["epsilon"] == pytest.approx(eps2, rel=1e-6) and out["epsilon"] <= max_epsilon
    assert out["array-sums"]["3"] == out["array-sums"]["2"] != out["array-sums"]["1"]
    assert out["train-metrics"]["2"]["dp-epsilon"] == pytest.approx(eps2, rel=1e-6)

    # What reached FedAvg each round: SecAgg+'s one aggregate reply, weight = 3 clients
    # (the clipping mod set each client's weight to 1), DP bookkeeping removed.
    first, second = (out["replies"][r] for r in ("1", "2"))
    assert len(first) == len(second) == 1
    assert first[0]["num-examples"] == second[0]["num-examples"] == NODES
    assert "dp-unclipped-count" not in first[0]
    assert out["train-metrics"]["1"]["dp-contributors"] == NODES
    # DP-SGD: the clients' Opacus ledgers composed over both rounds (context.state).
    assert second[0]["dp-sgd-steps"] == 2 * first[0]["dp-sgd-steps"] > 0
    assert second[0]["dp-sgd-epsilon"] > first[0]["dp-sgd-epsilon"] > 0

    # A restarted ServerApp continues from the checkpointed epsilon and refuses round 3.
    restarted = DPFedAvg(_fedavg(), noise_multiplier=Z, clipping_norm=1.0,
                         max_epsilon=max_epsilon, delta=DELTA, checkpoint=str(checkpoint))
    assert restarted.epsilon == pytest.approx(eps2, rel=1e-9)
    assert not restarted.budget.can_afford(Z, 1.0).allowed


def _fedavg():
    from flwr.serverapp.strategy import FedAvg

    return FedAvg()
