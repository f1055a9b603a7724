"""The same reference app in Flower's Ray simulation."""

from __future__ import annotations

import pytest

from conftest import alive
from flwr_guard.demo import DemoOptions, run_demo

pytestmark = pytest.mark.simulation


def test_digits_app_in_simulation_learns(tmp_path) -> None:
    result = run_demo(
        DemoOptions(nodes=3, rounds=2, simulation=True, partition="dirichlet", alpha=1.0)
    )
    assert result.success, result.error
    assert result.mode == "simulation"
    accuracy = [r["server"]["test-accuracy"] for r in result.rounds]
    assert len(accuracy) == 3 and accuracy[-1] > accuracy[0] + 0.3
    assert all(r["train-replies"] == 3 for r in result.rounds[1:])
    assert alive(result.processes) == []
