"""`flwr-guard robustness` writes its JSON, Markdown table and figures."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flwr_guard.cli import app


def test_robustness_command_writes_json_markdown_and_figures(tmp_path) -> None:
    out = tmp_path / "rob"
    result = CliRunner().invoke(app, [
        "robustness", "--objectives", "plain", "--epochs", "2", "--eps", "0.1",
        "--test-examples", "24", "--zo-examples", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "robustness.json").read_text())
    (model,) = record["models"]
    assert set(model["robust_accuracy"]) == {"fgsm", "pgd", "spsa", "square"}
    assert model["robust_accuracy"]["pgd"]["1.0"] == 0.0  # unbounded PGD always wins
    assert "masking" in model and "attribution_scores" in model
    assert "| plain | 1 |" in (out / "robustness.md").read_text()
    for png in ("robustness_accuracy.png", "robustness_attributions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_robustness_command_refuses_an_unknown_objective(tmp_path) -> None:
    result = CliRunner().invoke(app, ["robustness", "--objectives", "trades", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "one of plain, cure" in result.output


def test_demo_refuses_a_robust_objective_with_dp_sgd_before_starting_anything() -> None:
    result = CliRunner().invoke(app, ["demo", "--simulation", "--robust-objective", "cure"])
    assert result.exit_code == 2 and "--no-dp-sgd" in result.output
