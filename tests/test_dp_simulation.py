"""DP-SGD, update clipping inside SecAgg+, and SecAggPlus(DPFedAvg(FedAvg)) with a
budget, inside a real Flower simulation."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, alive

from flwr_guard.demo import DemoOptions, run_demo
from flwr_guard.dp.accounting import compute_epsilon
from flwr_guard.dp.strategy import DPFedAvg

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
    assert not {"dp-unclipped-count", "dp-clipped-count", "dp-noised-count"} & set(first[0])
    assert "dp-contributors" not in out["train-metrics"]["1"]  # the count is not released
    # The masked clipped count matched the 3 contributors: the noise is z C / 3 on the mean.
    assert out["train-metrics"]["1"]["dp-noise-std"] == pytest.approx(Z * 1.0 / NODES)
    # DP-SGD: the clients' Opacus ledgers composed over both rounds (context.state).
    assert second[0]["dp-sgd-steps"] == 2 * first[0]["dp-sgd-steps"] > 0
    assert second[0]["dp-sgd-epsilon"] > first[0]["dp-sgd-epsilon"] > 0

    # A restarted ServerApp continues from the checkpointed epsilon and refuses round 3.
    restarted = DPFedAvg(_fedavg(), noise_multiplier=Z, clipping_norm=1.0,
                         expected_contributors=NODES, max_epsilon=max_epsilon, delta=DELTA,
                         checkpoint=str(checkpoint))
    assert restarted.epsilon == pytest.approx(eps2, rel=1e-9)
    assert not restarted.budget.can_afford(Z, 1.0).allowed


def _fedavg():
    from flwr.serverapp.strategy import FedAvg

    return FedAvg()


def test_distributed_dp_through_secagg_carries_the_calibrated_noise(tmp_path) -> None:
    # Every client sends a zero update, so the global model moves by the noise alone:
    # the clients' Skellam noise, summed inside SecAgg+ and averaged over n survivors.
    # Calibrated for min-contributors m: per coordinate, std = sqrt(n / m) * z * D * step / n
    # with D = C / step + sqrt(d) (the quantised update's L2 sensitivity, integer units).
    z, clip, m = 1.0, 1.0, 2
    result_file = tmp_path / "result.json"
    result = run_demo(
        DemoOptions(
            nodes=NODES, rounds=1, simulation=True, app_dir=FIXTURES / "dp_app",
            run_config={
                "result-file": str(result_file), "zero-update": True,
                "dp-distributed": True, "dp-min-contributors": m, "dp-relation": "zero-out",
                "dp-noise-multiplier": z, "dp-clipping-norm": clip, "dp-delta": DELTA,
            },
        )
    )
    assert result.success, result.error
    out = json.loads(result_file.read_text())
    d = out["num-values"]
    step = 2 * 2.0 / 2**16  # SecAggPlus defaults: clipping range 2, quantisation range 2^16
    expected = (NODES / m) ** 0.5 * z * (clip / step + d**0.5) * step / NODES
    assert out["update-std"]["1"] == pytest.approx(expected, rel=0.03)  # d ~ 38k values
    # The server added no noise of its own and accounted the survivors' Skellam noise
    # with Skellam's RDP (Agarwal et al. 2021), no amplification, under the zero-out
    # relation asked for: a little above the Gaussian of the same variance, z * sqrt(n / m).
    # (Under add/remove, the default, the departing client's noise share makes it far
    # larger at d ~ 38k: tests/test_dp_relation.py.)
    gaussian = compute_epsilon(z * (NODES / m) ** 0.5, 1.0, 1, DELTA)
    assert gaussian < out["epsilon"] < 1.05 * gaussian
    assert out["train-metrics"]["1"]["secagg-wraparounds"] == 0
