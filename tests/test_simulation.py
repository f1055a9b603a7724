"""The same reference app in Flower's Ray simulation."""

from __future__ import annotations

import pytest
from conftest import alive

from flwr_guard.demo import DemoOptions, run_demo

pytestmark = pytest.mark.simulation


def test_digits_app_in_simulation_learns_then_stops_at_the_record_level_budget(tmp_path) -> None:
    # 2 nodes, DP-SGD z=1.5, q=1/6, 12 steps a round: epsilon 2.62 after round 1, 3.46
    # after round 2; round 3 would reach 4.14 > 3.8. Every node refuses round 3 with a
    # clear error, SecAgg+ aborts it, and the model stays that of round 2.
    result = run_demo(
        DemoOptions(nodes=2, rounds=3, simulation=True,
                    run_config={"dp-sgd-max-epsilon": 3.8, "fraction-evaluate": 0.0,
                                "audit": False},  # the audit has its own simulation test
                    workdir=tmp_path / "work")
    )
    assert result.success, result.error
    assert result.mode == "simulation"
    accuracy = [r["server"]["test-accuracy"] for r in result.rounds]
    assert len(accuracy) == 4 and accuracy[2] > accuracy[0] + 0.2
    one, two, three = result.rounds[1:]
    assert one["train-replies"] == two["train-replies"] == 2
    assert one["secagg"]["aborted"] is None and two["secagg"]["aborted"] is None
    assert two["train"]["dp-sgd-epsilon"] == pytest.approx(3.4648, abs=1e-3)
    assert result.privacy["dp-sgd-epsilon"] <= 3.8
    assert three["secagg"]["aborted"] is not None
    assert three["secagg"]["dropouts"]["masked-input"] == 2  # both nodes refused to train
    assert three["server"] == two["server"]  # the global model did not change
    assert alive(result.processes) == []
