"""The same reference app in Flower's Ray simulation."""

from __future__ import annotations

import pytest

from conftest import alive
from flwr_guard.demo import DemoOptions, run_demo

pytestmark = pytest.mark.simulation


def test_digits_app_in_simulation_learns(tmp_path) -> None:
    result = run_demo(
        DemoOptions(nodes=3, rounds=2, simulation=True)
    )
    assert result.success, result.error
    assert result.mode == "simulation"
    accuracy = [r["server"]["test-accuracy"] for r in result.rounds]
    assert len(accuracy) == 3 and accuracy[-1] > accuracy[0] + 0.2
    assert all(r["train-replies"] == 3 for r in result.rounds[1:])
    assert result.privacy["dp-sgd-epsilon"] > 0
    assert alive(result.processes) == []


def test_record_level_budget_stops_training_and_keeps_the_model(tmp_path) -> None:
    # Round 1 spends epsilon 2.62 (z=1.5, 2 nodes, q=1/6, 12 steps); round 2 would reach
    # 3.46 > 3.0: every node refuses with a clear error, SecAgg+ aborts the round, the
    # model stays as it was.
    result = run_demo(
        DemoOptions(nodes=2, rounds=2, simulation=True,
                    run_config={"dp-sgd-max-epsilon": 3.0, "fraction-evaluate": 0.0},
                    workdir=tmp_path / "work")
    )
    assert result.success, result.error
    one, two = result.rounds[1], result.rounds[2]
    assert one["secagg"]["aborted"] is None and two["secagg"]["aborted"] is not None
    assert two["server"] == one["server"]  # the global model did not change
    assert two["secagg"]["dropouts"]["masked-input"] == 2  # both nodes refused to train
