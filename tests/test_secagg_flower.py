"""SecAgg+ through real Flower runs (Ray simulation and a local deployment)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, alive
from scipy import stats
from secagg_harness import UNIFORM_P_FLOOR

from flwr_guard.demo import DemoOptions, run_demo

APP = FIXTURES / "secagg_app"


def _run(tmp_path, nodes: int, simulation: bool = True, **config) -> tuple[dict, object]:
    out = tmp_path / "out"
    result = run_demo(
        DemoOptions(
            nodes=nodes,
            min_nodes=nodes,  # the fixture reads min-nodes as its node count
            rounds=1,
            simulation=simulation,
            app_dir=APP,
            run_config={"out-dir": str(out), **config},
            workdir=tmp_path / "work",
            # the fixture's chaos mod acts on SecAgg+ stages inside the app, and its server
            # sends no manifest: plain SuperNodes (the node guard takes the protocol)
            node_guard=False,
        )
    )
    assert result.success, result.error
    assert alive(result.processes) == []
    return json.loads((out / "result.json").read_text()), out


@pytest.mark.simulation
def test_simulation_a_third_dropping_gives_the_survivors_weighted_average(tmp_path) -> None:
    # t = 3 of k = 5: the server's default for 6 connected nodes (C = ceil(0.05 x 6) = 1,
    # t = 4) leaves one loss per neighbourhood; the simulation's clients accept t = 3.
    res, out = _run(tmp_path, nodes=6, **{"drop-partitions": "1,4", "drop-stage": "masked-input",
                                          "reconstruction-threshold": 3})
    report = res["report"]
    assert report["aborted"] is None
    assert report["cohort"] == 6 and report["survivors"] == 4
    assert report["dropouts"]["masked-input"] == 2
    got, expected = np.array(res["aggregate"]), np.array(res["expected"])
    assert np.abs(got - expected).max() < res["step"]  # within one quantisation step
    assert "train-loss" in res["metrics"]["1"]  # plain metrics still reach the strategy

    # The curious server's whole view: every array it received. Only the masked
    # vectors carry update-sized data, and they are uniform and uncorrelated with
    # every client's true update.
    view = list(np.load(out / "view.npz").values())
    truth = list(np.load(out / "truth.npz").values())
    big = [v for v in view if v.size > 100]
    assert len(big) == 4 and all(v.dtype == np.uint32 for v in big)
    for vector in big:
        u = vector[:-1].astype(np.float64) / 2.0**32
        assert stats.kstest(u, "uniform").pvalue > UNIFORM_P_FLOOR
        assert max(abs(np.corrcoef(u, t)[0, 1]) for t in truth) < 0.15


@pytest.mark.simulation
def test_simulation_wraps_fedadam(tmp_path) -> None:
    res, _ = _run(tmp_path, nodes=3, strategy="fedadam")
    assert res["report"]["survivors"] == 3 and res["report"]["aborted"] is None
    got, expected = np.array(res["aggregate"]), np.array(res["expected"])
    # FedAdam steps along the (exact) average update
    significant = np.abs(expected) > 10 * res["step"]
    assert (np.sign(got[significant]) == np.sign(expected[significant])).mean() > 0.99


@pytest.mark.simulation
def test_simulation_below_threshold_fails_clearly_and_keeps_the_model(tmp_path) -> None:
    res, _ = _run(tmp_path, nodes=4, **{"drop-partitions": "0,1,2", "drop-stage": "masked-input"})
    assert res["aggregate"] is None  # the global model was not replaced
    assert "aborted at masked-input" in res["report"]["aborted"]
    assert "reconstruction threshold" in res["report"]["aborted"]


@pytest.mark.deployment
def test_deployment_fedprox_aggregate_equals_plain_weighted_average(tmp_path) -> None:
    # FedProx's server side is FedAvg's (the proximal term is the clients'): through
    # SecAgg+ on a real deployment the aggregate is the plain weighted average.
    res, _ = _run(tmp_path, nodes=3, simulation=False, strategy="fedprox")
    assert res["report"]["survivors"] == 3
    got, expected = np.array(res["aggregate"]), np.array(res["expected"])
    assert np.abs(got - expected).max() < res["step"]
