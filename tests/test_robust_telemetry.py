"""The robustness metric families register, are set from round data, are documented and
are on the robustness dashboard."""

from __future__ import annotations

import json
import re

import jsonschema
from conftest import FIXTURES, REPO
from prometheus_client import generate_latest
from test_telemetry_metrics import exposed_names, samples, value

from flwr_guard.telemetry import GuardMetrics, TelemetryRecorder
from flwr_guard.telemetry.robustness import ROBUST_FAMILIES

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "robustness.json"
SERVER_ROUND = {
    "test-accuracy": 0.9, "robust-acc-none-0": 0.95, "robust-acc-pgd-0.1": 0.25,
    "robust-acc-pgd-1": 0.0, "robust-acc-square-0.1": 0.5, "robust-masking-suspected": 0.0,
    "robust-attr-gradcam++-deletion_auc": 0.12, "robust-attr-ig-topk_intersection": 0.8,
    "robust-eval-seconds": 12.5, "robust-acc-pgd-0.2": float("nan"),
}


def test_robustness_families_register_and_follow_the_naming_rules() -> None:
    metrics = GuardMetrics()
    for family in ROBUST_FAMILIES:
        assert family in metrics.families
        assert family.name.startswith("flwr_guard_robust_")
        assert family.labels[:2] == ("run", "strategy")
        assert family.kind != "counter" or family.name.endswith("_total")
        assert not re.search(r"(_ms|_millis|_percent)$", family.name)
    # nothing is exported before a robustness evaluation ran
    text = generate_latest(metrics.registry).decode()
    assert not {n for n, _ in samples(text)} & exposed_names(ROBUST_FAMILIES)


def test_round_data_sets_the_robustness_metrics() -> None:
    metrics = GuardMetrics()
    recorder = TelemetryRecorder(metrics, run="7", strategy="FedAvg")
    recorder.progress("train", {"train-loss": 0.4, "robust-train-seconds-per-step": 0.031})
    recorder.progress("server", SERVER_ROUND)
    recorder.progress("server", {"test-accuracy": 0.91})  # a round without robustness evaluation
    text = generate_latest(metrics.registry).decode()
    assert value(text, "flwr_guard_robust_accuracy_ratio", attack="pgd", eps="0.1") == 0.25
    assert value(text, "flwr_guard_robust_accuracy_ratio", attack="pgd", eps="1") == 0.0
    assert value(text, "flwr_guard_robust_accuracy_ratio", attack="none", eps="0") == 0.95
    assert ("flwr_guard_robust_accuracy_ratio",
            frozenset({"run": "7", "strategy": "FedAvg", "attack": "pgd", "eps": "0.2"}.items())
            ) not in samples(text)  # NaN skipped
    assert value(text, "flwr_guard_robust_attribution_score", method="gradcam++", score="deletion_auc") == 0.12
    assert value(text, "flwr_guard_robust_masking_suspected") == 0.0
    assert value(text, "flwr_guard_robust_evaluations_total") == 1
    assert value(text, "flwr_guard_robust_evaluation_seconds") == 12.5
    assert value(text, "flwr_guard_robust_training_step_seconds") == 0.031


def test_the_dashboard_validates_and_shows_every_robustness_family() -> None:
    schema = json.loads((FIXTURES / "telemetry_grafana" / "dashboard.schema.json").read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    jsonschema.validate(dashboard, schema)
    used = set()
    for panel in dashboard["panels"]:
        for t in panel["targets"]:
            used |= set(re.findall(r"\bflwr_guard_[a-z0-9_]+", t["expr"]))
    assert used <= exposed_names(ROBUST_FAMILIES) | {"flwr_guard_run_info"}
    assert used == exposed_names(ROBUST_FAMILIES)


def test_docs_list_every_robustness_metric_with_its_type() -> None:
    text = (REPO / "docs" / "metrics.md").read_text()
    for family in ROBUST_FAMILIES:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{family.name}`")), None)
        assert row is not None, f"{family.name} is not in docs/metrics.md"
        assert f"| {family.kind} |" in row, row
