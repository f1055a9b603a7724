"""Telemetry core: metric families, the recorder, the exporter, Pushgateway mode, config.

Values are read back the way Prometheus reads them: the exporter's HTTP text format,
parsed by prometheus-client's own parser; `promtool check metrics` (Debian's
`prometheus` package) lints it; the Pushgateway is Debian's `prometheus-pushgateway`.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flwr_guard.deployment import free_port
from flwr_guard.secagg.strategy import RoundReport
from flwr_guard.telemetry import (
    FAMILIES,
    NODE_FAMILIES,
    Address,
    DPState,
    GuardMetrics,
    MetricsExporter,
    Pushgateway,
    ReplyView,
    TelemetryConfig,
    TelemetryRecorder,
)

PROMTOOL = shutil.which("promtool")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    want = {"run": "7", "strategy": "FedAvg", **labels}
    return samples(text)[(name, frozenset(want.items()))]


def exposed_names(families) -> set[str]:
    names = set()
    for f in families:
        if f.kind == "histogram":
            names |= {f.name + "_bucket", f.name + "_sum", f.name + "_count"}
        else:
            names.add(f.name)
    return names


def full_round(metrics: GuardMetrics) -> TelemetryRecorder:
    """Feed the recorder one round of everything (numbers chosen to check sums)."""
    recorder = TelemetryRecorder(metrics, "7", "FedAvg", client_statistics=True,
                                 record_epsilon_budget=8.0, record_delta=1e-4)
    recorder.run_info(["SecAggPlus", "DPFedAvg", "FedAvg"], ["secagg", "dp"])
    recorder.run_started(5)
    recorder.round_started(1)
    audited = {"audit-ran": 1, "audit-error": 0, "audit-leaks": 1, "audit-psnr-db": 24.0,
               "audit-psnr-gain-db": 9.5, "audit-ssim": 0.55, "audit-identified-rate": 1.0}
    quiet = {"audit-ran": 0, "audit-error": 0, "audit-leaks": 0, "audit-psnr-db": 0.0,
             "audit-psnr-gain-db": 0.0, "audit-ssim": 0.0, "audit-identified-rate": 0.0}
    recorder.replies([
        ReplyView(11, True, {**audited, "dp-sgd-epsilon": 2.5, "dp-unclipped-count": 1.0}, 0.4),
        ReplyView(12, True, {**quiet, "dp-sgd-epsilon": 3.25, "dp-unclipped-count": 0.0}, 2.0),
        ReplyView(13, True, {**quiet, "audit-error": 1, "dp-sgd-epsilon": 1.0,
                             "dp-unclipped-count": 0.0, "inspector-violations": 2}, 5.0),
        ReplyView(14, False, {}, error="flwr-guard audit: update blocked (round 1): identified"),
    ])
    report = RoundReport(
        1, cohort=5, survivors=3, num_shares=4, reconstruction_threshold=3, modulus_bits=32,
        dropouts={"advertise": 1, "share-keys": 0, "masked-input": 1, "consistency": 0, "unmask": 0},
        stage_seconds={"advertise": 0.2, "masked-input": 3.0, "unmask-compute": 0.01},
        bytes_to_clients={"advertise": 1000, "masked-input": 50_000},
        bytes_from_clients={"advertise": 1200, "masked-input": 40_000}, clipped_values=17,
    )
    recorder.secagg_round(report.to_dict())
    recorder.dp_state(DPState(epsilon=3.5, max_epsilon=10.0, delta=1e-5, noise_multiplier=1.1,
                              clipping_norm=0.7, noise_std=0.25))
    recorder.progress("train", {"train-loss": 1.25})
    recorder.progress("evaluate", {"eval-loss": 1.5, "eval-acc": 0.5})
    recorder.progress("server", {"test-loss": 1.75, "test-accuracy": 0.625})
    recorder.round_finished(1, "aggregated", sampled=5, replied=3)
    return recorder


def test_recorder_exports_what_one_round_did() -> None:
    metrics = GuardMetrics(per_node=True)
    full_round(metrics)
    text = generate_latest(metrics.registry).decode()
    # rounds, cohort, replies
    assert value(text, "flwr_guard_rounds_total", outcome="aggregated") == 1
    assert value(text, "flwr_guard_round") == 1 and value(text, "flwr_guard_rounds_planned") == 5
    assert value(text, "flwr_guard_clients_sampled_total") == 5
    assert value(text, "flwr_guard_round_clients_replied") == 3
    assert value(text, "flwr_guard_round_duration_seconds_count") == 1
    # SecAgg+: per-stage dropouts, bytes, durations; margin inputs
    assert value(text, "flwr_guard_secagg_dropouts_total", stage="advertise") == 1
    assert value(text, "flwr_guard_secagg_dropouts_total", stage="share-keys") == 0
    assert value(text, "flwr_guard_secagg_sent_bytes_total", stage="masked-input") == 50_000
    assert value(text, "flwr_guard_secagg_received_bytes_total", stage="advertise") == 1200
    assert value(text, "flwr_guard_secagg_stage_duration_seconds_sum", stage="masked-input") == 3.0
    assert value(text, "flwr_guard_secagg_stage_duration_seconds_bucket", stage="masked-input", le="2.5") == 0
    assert value(text, "flwr_guard_secagg_stage_duration_seconds_bucket", stage="masked-input", le="5.0") == 1
    assert value(text, "flwr_guard_secagg_surviving_clients") == 3
    assert value(text, "flwr_guard_secagg_reconstruction_threshold") == 3
    assert value(text, "flwr_guard_secagg_clipped_values_total") == 17
    assert value(text, "flwr_guard_secagg_key_setups_total") == 1
    assert value(text, "flwr_guard_modular_wraparounds_total") == 0
    # DP: user level from the wrapper, record level = the worst client, budgets
    assert value(text, "flwr_guard_dp_epsilon", level="user") == 3.5
    assert value(text, "flwr_guard_dp_epsilon_budget", level="user") == 10.0
    assert value(text, "flwr_guard_dp_epsilon", level="record") == 3.25
    assert value(text, "flwr_guard_dp_epsilon_budget", level="record") == 8.0
    assert value(text, "flwr_guard_dp_delta", level="record") == 1e-4
    assert value(text, "flwr_guard_dp_noise_multiplier") == 1.1
    assert value(text, "flwr_guard_dp_budget_exhausted") == 0
    # client statistics: norms histogram, clipped fraction 2 of 3
    assert value(text, "flwr_guard_update_l2_norm_count") == 3
    assert value(text, "flwr_guard_update_l2_norm_bucket", le="1.0") == 1
    assert value(text, "flwr_guard_clipped_updates_ratio") == pytest.approx(2 / 3)
    # audit: only the audited reply is scored; the error and the blocked reply count
    assert value(text, "flwr_guard_audits_total") == 1
    assert value(text, "flwr_guard_audit_leak_verdicts_total") == 1
    assert value(text, "flwr_guard_audit_errors_total") == 1
    assert value(text, "flwr_guard_audit_blocked_updates_total") == 1
    assert value(text, "flwr_guard_audit_psnr_decibels_sum") == 24.0
    assert value(text, "flwr_guard_audit_worst_psnr_gain_decibels") == 9.5
    assert value(text, "flwr_guard_audit_worst_identification_ratio") == 1.0
    assert value(text, "flwr_guard_inspector_violations_total") == 2
    # progress by phase
    assert value(text, "flwr_guard_loss", phase="server") == 1.75
    assert value(text, "flwr_guard_accuracy_ratio", phase="evaluate") == 0.5
    # per node, only because per_node=True
    assert value(text, "flwr_guard_node_train_replies_total", node="14", status="error") == 1
    assert value(text, "flwr_guard_node_dp_record_epsilon", node="12") == 3.25
    # every family of FAMILIES and NODE_FAMILIES is exported, and nothing else
    names = {n for n, _ in samples(text)} - {n for n, _ in samples(text) if n.endswith("_created")}
    assert names == exposed_names(FAMILIES + NODE_FAMILIES)


def test_worst_values_and_record_epsilon_only_grow_over_a_run() -> None:
    metrics = GuardMetrics()
    recorder = full_round(metrics)
    recorder.replies([ReplyView(11, True, {"audit-ran": 1, "audit-psnr-db": 12.0, "audit-ssim": 0.1,
                                           "audit-identified-rate": 0.0, "dp-sgd-epsilon": 1.5})])
    text = generate_latest(metrics.registry).decode()
    assert value(text, "flwr_guard_audit_worst_psnr_decibels") == 24.0
    assert value(text, "flwr_guard_audit_psnr_decibels_count") == 2
    assert value(text, "flwr_guard_dp_epsilon", level="record") == 3.25


def test_labels_stay_low_cardinality_without_the_per_node_option() -> None:
    metrics = GuardMetrics()
    full_round(metrics)
    text = generate_latest(metrics.registry).decode()
    labels = {k for (_, ls) in samples(text) for k, _ in ls}
    assert labels == {"run", "strategy", "stage", "phase", "level", "outcome", "le", "chain",
                      "protections"}
    assert "node" not in text
    assert all(f.labels[:2] == ("run", "strategy") for f in FAMILIES + NODE_FAMILIES)


def test_blocked_replies_count_for_the_audit_gate_and_the_reply_inspection() -> None:
    metrics = GuardMetrics()
    recorder = TelemetryRecorder(metrics, "7", "FedAvg")
    recorder.replies([
        ReplyView(1, False, {}, error="flwr-guard reply inspection: reply blocked: per-example-metric"),
        ReplyView(2, False, {}, error="flwr-guard audit: update blocked (round 3): identified"),
        ReplyView(3, False, {}, error="ClientApp raised an exception"),
    ])
    recorder.inspector_findings(3)  # a server-side ReplyGuard's new findings
    text = generate_latest(metrics.registry).decode()
    assert value(text, "flwr_guard_inspector_violations_total") == 4
    assert value(text, "flwr_guard_audit_blocked_updates_total") == 1


def test_client_statistics_off_exports_no_norms_or_clipping_bits() -> None:
    metrics = GuardMetrics()
    recorder = TelemetryRecorder(metrics, "7", "FedAvg", client_statistics=False)
    recorder.replies([ReplyView(1, True, {"dp-unclipped-count": 0.0}, 3.0)])
    text = generate_latest(metrics.registry).decode()
    assert "flwr_guard_update_l2_norm_count{" not in text
    assert "flwr_guard_clipped_updates_ratio{" not in text


def test_nan_lists_and_bad_values_are_ignored() -> None:
    metrics = GuardMetrics()
    recorder = TelemetryRecorder(metrics, "7", "FedAvg")
    recorder.replies([ReplyView(1, True, {"dp-sgd-epsilon": math.nan, "audit-ran": 1,
                                          "audit-psnr-db": [30.0, 31.0], "audit-ssim": "x"})])
    text = generate_latest(metrics.registry).decode()
    assert 'level="record"' not in text
    assert value(text, "flwr_guard_audits_total") == 1
    assert "flwr_guard_audit_psnr_decibels_count{" not in text  # a list is never exported
    with pytest.raises(ValueError, match="outcome"):
        recorder.round_finished(1, "crashed", 1, 1)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed: `make tools`")
def test_exporter_serves_the_registry_and_promtool_accepts_it(tmp_path) -> None:
    metrics = GuardMetrics(per_node=True)
    full_round(metrics)
    with MetricsExporter(metrics.registry, "127.0.0.1:0") as exporter:
        assert exporter.address.port > 0
        text = httpx.get(exporter.url, timeout=5).text
        # a second exporter on the same port fails with the address in the message
        with pytest.raises(OSError, match=f"127.0.0.1:{exporter.address.port}"):
            MetricsExporter(metrics.registry, exporter.address).start()
    assert value(text, "flwr_guard_dp_epsilon", level="user") == 3.5
    with pytest.raises(httpx.HTTPError):
        httpx.get(exporter.url, timeout=2)  # stopped
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # the leakage audit's endpoint check finds no gradient, per-example or high-cardinality
    # family in what the exporter serves (per-node families included)
    from flwr_guard.inspection.endpoints import check_exporter_text

    assert check_exporter_text(exporter.url, text) == []


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed: `make tools`")
def test_promtool_check_metrics_rejects_a_badly_named_family() -> None:
    """The lint is real: a counter named like a gauge in base units fails."""
    bad = "# HELP x_milliseconds bad\n# TYPE x_milliseconds counter\nx_milliseconds 1\n"
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=bad, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode != 0


@pytest.mark.skipif(PUSHGATEWAY is None, reason="prometheus-pushgateway is not installed: `make tools`")
def test_pushgateway_mode_with_a_real_pushgateway(tmp_path) -> None:
    port = free_port()
    log = (tmp_path / "pushgateway.log").open("wb")
    gateway = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/-/ready")
        assert gateway.poll() is None, (tmp_path / "pushgateway.log").read_text()
        metrics = GuardMetrics()
        full_round(metrics)
        pusher = Pushgateway(url, run="7")
        assert pusher.push(metrics.registry)
        text = httpx.get(f"{url}/metrics", timeout=5).text
        got = samples(text)
        key = ("flwr_guard_dp_epsilon",
               frozenset({"job": "flwr-guard", "run": "7", "strategy": "FedAvg",
                          "level": "user", "instance": ""}.items()))
        assert got[key] == 3.5
        pusher.delete()
        assert 'run="7"' not in httpx.get(f"{url}/metrics", timeout=5).text
        assert gateway.poll() is None  # it was our gateway that answered
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        log.close()
    # the gateway is gone: a push fails, is counted and logged, never raised
    assert not pusher.push(metrics.registry) and pusher.failures == 1


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def test_config_from_run_config_and_environment() -> None:
    default = TelemetryConfig.from_run_config({}, environ={})
    assert default.address == Address("127.0.0.1", 9464) and default.pushgateway_url is None
    assert default.client_statistics is None and default.enabled
    deployed = TelemetryConfig.from_run_config(
        {"metrics-address": ""},
        environ={"FLWR_GUARD_METRICS_ADDRESS": "0.0.0.0:9464",
                 "FLWR_GUARD_PUSHGATEWAY_URL": "http://pushgateway:9091"})
    assert deployed.address == Address("0.0.0.0", 9464)
    assert deployed.pushgateway_url == "http://pushgateway:9091"
    explicit = TelemetryConfig.from_run_config(
        {"metrics-address": "[::1]", "metrics-port": 9500, "metrics-client-statistics": "on",
         "metrics-per-node": True, "dp-sgd-max-epsilon": 8.0, "metrics": False},
        environ={"FLWR_GUARD_METRICS_ADDRESS": "0.0.0.0:9464"})
    assert explicit.address == Address("::1", 9500) and str(explicit.address) == "[::1]:9500"
    assert explicit.client_statistics is True and explicit.per_node
    assert explicit.record_epsilon_budget == 8.0 and not explicit.enabled
    for bad, match in (({"metrics-port": 70000}, "metrics-port"),
                       ({"metrics-address": "host:http"}, "not a number"),
                       ({"metrics-client-statistics": "maybe"}, "metrics-client-statistics"),
                       ({"metrics-linger": -1}, "metrics-linger")):
        with pytest.raises(ValueError, match=match):
            TelemetryConfig.from_run_config(bad, environ={})
    with pytest.raises(ValueError, match="http"):
        Pushgateway("pushgateway:9091", run="1")


def test_preferred_port_falls_back_to_a_free_one() -> None:
    from flwr_guard.telemetry.exporter import preferred_port

    port = free_port()
    assert preferred_port(port) == port
    metrics = GuardMetrics()
    with MetricsExporter(metrics.registry, f"127.0.0.1:{port}"):
        other = preferred_port(port)
        assert other != port and other > 0


def test_docs_list_every_metric_with_its_type() -> None:
    text = (REPO / "docs" / "metrics.md").read_text()
    for family in FAMILIES + NODE_FAMILIES:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{family.name}`")), None)
        assert row is not None, f"{family.name} is not in docs/metrics.md"
        assert f"| {family.kind} |" in row, row
    assert Path(REPO / "docs" / "metrics.md").exists()


def test_adapter_finds_the_protections_in_the_strategy_chain() -> None:
    from flwr.serverapp.strategy import FedAvg

    from flwr_guard.dp.strategy import DPFedAvg
    from flwr_guard.inspection.reply_guard import ReplyGuard
    from flwr_guard.secagg.strategy import SecAggPlus
    from flwr_guard.telemetry.strategy import TelemetryStrategy

    guard = ReplyGuard(FedAvg())
    dp = DPFedAvg(guard, noise_multiplier=1.0, clipping_norm=1.0, max_epsilon=8.0,
                  expected_contributors=2, checkpoint=None)
    secagg = SecAggPlus(dp)
    telemetry = TelemetryStrategy(secagg, run="7")
    assert (telemetry.secagg, telemetry.dp, telemetry.reply_guard) == (secagg, dp, guard)
    assert telemetry.chain == ["SecAggPlus", "DPFedAvg", "ReplyGuard", "FedAvg"]
    assert telemetry.client_statistics is False  # a DP wrapper is in the chain
    text = generate_latest(telemetry.metrics.registry).decode()
    assert value(text, "flwr_guard_run_info", chain="SecAggPlus>DPFedAvg>ReplyGuard>FedAvg",
                 protections="dp,reply-inspection,secagg") == 1
    bare = TelemetryStrategy(FedAvg(), run="8")
    assert bare.secagg is None and bare.dp is None and bare.client_statistics is True
    assert bare.fraction_train == 1.0  # delegates what it does not define
