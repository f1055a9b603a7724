"""Telemetry against the real tools: Prometheus, promtool, a Pushgateway, Grafana's
dashboard model.

- alert rules: `promtool check rules`, `promtool test rules` (every alert has a firing
  case), and the unit tests fail when a threshold is changed;
- dashboards: Grafana's dashboard JSON model (schema in tests/fixtures/telemetry_grafana),
  every PromQL expression names exported metrics only;
- one protected training run (Flower simulation of tests/fixtures/telemetry_app: DP-SGD,
  update clipping, leakage audit, SecAgg+ with a client dropping in round 2, DPFedAvg,
  TelemetryStrategy outermost) scraped by a real Prometheus server that also scrapes a
  real Pushgateway and loads the alert rules; epsilon, audit and SecAgg+ values read
  back through Prometheus' HTTP API equal what the strategies themselves report.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml
from conftest import FIXTURES, REPO, alive
from test_telemetry_metrics import PUSHGATEWAY, _wait_http, exposed_names

from flwr_guard.demo import DemoOptions, run_demo
from flwr_guard.deployment import free_port
from flwr_guard.telemetry import FAMILIES
from flwr_guard.telemetry.prometheus_server import LocalPrometheus

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
RULES = REPO / "deploy" / "prometheus" / "rules" / "flwr-guard.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "flwr-guard.test.yml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
SCHEMA = FIXTURES / "telemetry_grafana" / "dashboard.schema.json"
METRIC_NAME = re.compile(r"\bflwr_guard_[a-z0-9_]+")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed: `make tools`")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """``(dashboard file, panel title, expr)`` of every panel target."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            out += [(path.name, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def for_api(expr: str) -> str:
    """A dashboard expression as Grafana would send it, with every run selected."""
    return expr.replace("$run", ".*")


# --- alert rules -------------------------------------------------------------------------
@needs_promtool
def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0 and "6 rules found" in done.stdout, done.stdout + done.stderr
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    firing = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"] if case.get("exp_alerts")
    }
    assert {"FlwrGuardEpsilonNearBudget", "FlwrGuardLeakVerdict",
            "FlwrGuardSecAggDropoutsNearThreshold", "FlwrGuardScrapeFailed"} <= alerts
    assert alerts == firing


@needs_promtool
@pytest.mark.parametrize("old,new", [("> 0.8", "> 0.9"), ("0.5 * (", "0.8 * ("),
                                     ("leak_verdicts_total) > 0", "leak_verdicts_total) > 2")])
def test_rule_unit_tests_fail_when_a_threshold_changes(tmp_path, old: str, new: str) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules" / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    done = promtool("test", "rules", str(tmp_path / "tests" / RULE_TESTS.name))
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


# --- dashboards --------------------------------------------------------------------------
def test_dashboards_validate_against_grafana_dashboard_model() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    titles = set()
    assert len(DASHBOARDS) == 5
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        jsonschema.validate(dashboard, schema)
        titles.add(dashboard["title"])
        panels = dashboard["panels"]
        assert len({p["id"] for p in panels}) == len(panels), path.name
        cells = set()
        for p in panels:  # no two panels overlap on Grafana's 24-column grid
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (path.name, p["title"])
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, (path.name, p["title"])
            cells |= area
    assert titles == {"flwr-guard / Privacy budget", "flwr-guard / Leakage audit",
                      "flwr-guard / Secure aggregation health", "flwr-guard / Training progress",
                      "flwr-guard / Robustness"}
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_the_schema_refuses_what_grafana_would_not_read() -> None:
    schema = json.loads(SCHEMA.read_text())
    good = json.loads(DASHBOARDS[0].read_text())
    for broken in (
        {**good, "panels": [{**good["panels"][0], "gridPos": {"h": 5, "w": 30, "x": 0, "y": 0}}]},
        {**good, "panels": [{**good["panels"][0], "targets": [{"refId": "A"}]}]},
        {**good, "schemaVersion": "39"},
        {**good, "pannels": []},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_dashboard_queries_name_only_metrics_the_exporter_exports() -> None:
    from flwr_guard.telemetry.robustness import ROBUST_FAMILIES  # the robustness dashboard's

    exported = exposed_names(FAMILIES + ROBUST_FAMILIES)
    used = set()
    for name, title, expr in dashboard_queries():
        names = set(METRIC_NAME.findall(expr))
        assert names, (name, title, expr)
        assert names <= exported, (name, title, names - exported)
        used |= names
    rules = set(METRIC_NAME.findall(RULES.read_text()))
    assert rules <= exported
    # every family is on a dashboard or in a rule (run_info feeds the run variable)
    by_family = {f.name for f in FAMILIES if exposed_names([f]) & (used | rules)}
    assert by_family | {"flwr_guard_run_info"} == {f.name for f in FAMILIES}


# --- one protected run through a real Prometheus ------------------------------------------
@pytest.mark.simulation
@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None or PUSHGATEWAY is None,
                    reason="prometheus, promtool and prometheus-pushgateway are needed: `make tools`")
def test_protected_run_read_back_through_prometheus(tmp_path) -> None:
    exporter_port, gateway_port = free_port(), free_port()
    gateway_log = (tmp_path / "pushgateway.log").open("wb")
    gateway = subprocess.Popen(
        [str(PUSHGATEWAY), f"--web.listen-address=127.0.0.1:{gateway_port}"],
        stdout=gateway_log, stderr=subprocess.STDOUT)
    result_file = tmp_path / "result.json"
    try:
        _wait_http(f"http://127.0.0.1:{gateway_port}/-/ready")
        prom = LocalPrometheus(
            {"flwr-guard": [f"127.0.0.1:{exporter_port}"],
             "pushgateway": [f"127.0.0.1:{gateway_port}"]},
            rule_files=[RULES], workdir=tmp_path / "prometheus")
        with prom:
            done = promtool("check", "config", str(prom.workdir / "prometheus.yml"))
            assert done.returncode == 0, done.stdout + done.stderr
            started = time.time()
            result = run_demo(DemoOptions(
                nodes=3, rounds=2, simulation=True, app_dir=FIXTURES / "telemetry_app",
                status_interval_s=5.0,
                run_config={
                    "result-file": str(result_file), "metrics-port": exporter_port,
                    "pushgateway-url": f"http://127.0.0.1:{gateway_port}",
                    "metrics-linger": 2.0, "drop-partition": 1, "dp-sgd-max-epsilon": 2.5,
                },
            ))
            assert result.success, result.error
            assert alive(result.processes) == []
            truth = json.loads(result_file.read_text())
            _check_values(prom, truth)
            _check_alerts(prom)
            _check_dashboard_queries(prom)
            _check_exporter_was_scraped(prom, truth, started)
        # stopped by its PID, and reaped
        assert prom.process is None and prom.pid is not None
        assert not psutil.pid_exists(prom.pid)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        gateway_log.close()


def _check_values(prom: LocalPrometheus, truth: dict) -> None:
    """The Pushgateway's copy equals the truth. The run is over and the exporter gone, so
    its series are stale; the pushed ones are live, with the pushed job label
    (honor_labels) and the empty instance the Pushgateway gives them."""
    assert truth["telemetry-errors"] == 0
    run = truth["run"]

    def v(name: str, **labels: str) -> float:
        sel = ",".join(f'{k}="{val}"' for k, val in {"job": "flwr-guard", "instance": "", "run": run, **labels}.items())
        got = prom.value(f"{name}{{{sel}}}")
        assert got is not None, (name, labels)
        return got

    # DP: user level from DPFedAvg's accountant; record level = the worst client
    assert v("flwr_guard_dp_epsilon", level="user") == pytest.approx(truth["epsilon"], rel=1e-12)
    assert v("flwr_guard_dp_epsilon_budget", level="user") == truth["max-epsilon"]
    assert v("flwr_guard_dp_noise_multiplier") == truth["noise-multiplier"]
    replies = [r for rnd in truth["replies"].values() for r in rnd]
    assert v("flwr_guard_dp_epsilon", level="record") == pytest.approx(
        max(r["dp-sgd-epsilon"] for r in replies), rel=1e-12)
    assert v("flwr_guard_dp_epsilon_budget", level="record") == 2.5
    # leakage audit: every reply carried scores; count, verdicts, worst case
    audited = [r for r in replies if r["audit-ran"] == 1]
    assert audited and v("flwr_guard_audits_total") == len(audited)
    assert v("flwr_guard_audit_leak_verdicts_total") == sum(r["audit-leaks"] for r in audited)
    assert v("flwr_guard_audit_worst_psnr_decibels") == pytest.approx(
        max(r["audit-psnr-db"] for r in audited), rel=1e-12)
    assert v("flwr_guard_audit_psnr_decibels_count") == len(audited)
    # SecAgg+: per-stage dropouts and bytes summed over the rounds' reports
    reports = truth["secagg"]
    assert [r["server_round"] for r in reports] == [1, 2]
    # multi-round SecAgg+: round 1 sets keys up (advertise, roster), round 2 reuses them
    assert [r["key_setup"] for r in reports] == [True, False]
    assert v("flwr_guard_secagg_key_setups_total") == 1
    for stage in ("advertise", "roster", "masked-input", "consistency", "unmask"):
        dropped = sum(r["dropouts"].get(stage, 0) for r in reports)
        assert v("flwr_guard_secagg_dropouts_total", stage=stage) == dropped
        assert v("flwr_guard_secagg_sent_bytes_total", stage=stage) == sum(
            r["bytes_to_clients"].get(stage, 0) for r in reports)
        assert v("flwr_guard_secagg_received_bytes_total", stage=stage) == sum(
            r["bytes_from_clients"].get(stage, 0) for r in reports)
    assert v("flwr_guard_secagg_dropouts_total", stage="masked-input") >= 1  # the chaos client
    aborted = sum(r["aborted"] is not None for r in reports)
    assert v("flwr_guard_secagg_aborted_rounds_total") == aborted
    assert v("flwr_guard_rounds_total", outcome="aggregated") == 2 - aborted
    assert v("flwr_guard_secagg_stage_duration_seconds_count", stage="advertise") == 1
    assert v("flwr_guard_secagg_stage_duration_seconds_count", stage="masked-input") == 2
    # training progress: the server's last evaluation
    last = truth["server"][str(max(map(int, truth["server"])))]
    assert v("flwr_guard_accuracy_ratio", phase="server") == pytest.approx(last["test-accuracy"])
    assert v("flwr_guard_round") == 2 and v("flwr_guard_rounds_planned") == 2


def _check_alerts(prom: LocalPrometheus) -> None:
    """The real rule engine fired the alerts this run deserves, and no others."""
    fired = {(r["metric"]["alertname"], r["metric"].get("level", ""))
             for r in prom.query('max_over_time(ALERTS{alertstate="firing"}[1h])')}
    names = {name for name, _ in fired}
    assert ("FlwrGuardEpsilonNearBudget", "record") in fired  # worst client above 2.0 of 2.5
    assert ("FlwrGuardEpsilonNearBudget", "user") not in fired
    assert "FlwrGuardLeakVerdict" in names  # an undefended linear model leaks
    assert "FlwrGuardSecAggDropoutsNearThreshold" in names  # 1 of 3 dropped, t = 2
    assert "FlwrGuardExporterDownMidRun" not in names and "FlwrGuardScrapeFailed" not in names


# Panels that this run leaves empty, and why.
EMPTY_IN_THIS_RUN = {
    "Update L2 norm distribution": "client statistics are off with a DP wrapper",
    "Clipped updates": "client statistics are off; fixed clipping reports no noised fraction",
}
# This run evaluates no robustness (the fixture has no robust-eval); the robustness
# dashboard's queries must still evaluate; that its panels use the robustness families
# is checked in test_robust_telemetry.py.
NOT_EXERCISED = {"robustness.json"}


def _check_dashboard_queries(prom: LocalPrometheus) -> None:
    """Every query evaluates; every panel but the listed ones shows data."""
    panels: dict[tuple[str, str], bool] = {}
    for name, title, expr in dashboard_queries():
        result = prom.query(for_api(expr))  # raises on a syntax or type error
        if name not in NOT_EXERCISED:
            panels[(name, title)] = panels.get((name, title), False) or bool(result)
    empty = {title for (_, title), has_data in panels.items() if not has_data}
    assert empty == set(EMPTY_IN_THIS_RUN)


def _check_exporter_was_scraped(prom: LocalPrometheus, truth: dict, started: float) -> None:
    """The ServerApp's exporter itself was scraped during the run (now stale)."""
    series = prom.query_range(
        f'flwr_guard_dp_epsilon{{job="flwr-guard",instance!="",level="user",run="{truth["run"]}"}}',
        started, time.time(), 1.0)
    assert series, "the exporter was never scraped"
    values = [float(val) for _, val in series[0]["values"]]
    assert values[-1] == pytest.approx(truth["epsilon"], rel=1e-12)
    assert Path(prom.workdir).exists()
