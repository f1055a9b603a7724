"""Flower adapters of the audit, on real Flower messages and a real FedAvg:
the audit mod (scores, neutral keys, gate), the reply inspector (client mod and
server wrapper) and the server-side audit summary."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAvg

from flwr_guard.audit import (
    AuditPlan,
    AuditSampling,
    AuditSummary,
    LeakageAuditConfig,
    LocalTraining,
    Protections,
    SigmoidLeNet,
    leakage_audit_mod,
)
from flwr_guard.audit.audit_mod import BLOCKED_REASON
from flwr_guard.audit.data import client_pool
from flwr_guard.audit.report import neutral_metrics
from flwr_guard.guard.client_mod import POLICY_REFUSAL
from flwr_guard.inspection import ReplyGuard, reply_inspection_mod
from flwr_guard.inspection.reply import inspect_reply
from flwr_guard.inspection.reply_mod import BLOCKED_REASON as INSPECTION_BLOCKED

IMAGES, LABELS = client_pool(image_size=8, size=60, seed=2)


def _model() -> SigmoidLeNet:
    return SigmoidLeNet(image_size=8, generator=torch.Generator().manual_seed(0))


def _instruction(content: RecordDict, node: int = 7, kind: str = "train") -> Message:
    meta = Metadata(
        run_id=1, message_id=f"m{node}{kind}", src_node_id=0, dst_node_id=node,
        reply_to_message_id="", group_id="3", created_at=time.time(), ttl=600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def _train_message(node: int = 7) -> Message:
    return _instruction(RecordDict({
        "arrays": ArrayRecord(_model().state_dict()),
        "config": ConfigRecord({"server-round": 3, "lr": 0.1}),
    }), node)


def _context(node: int = 7) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _train(msg: Message, context: Context) -> Message:
    """A real ClientApp train step: one SGD epoch on the client's digits."""
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, 60, 20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(IMAGES[start:start + 20]), LABELS[start:start + 20])
        loss.backward()
        optimizer.step()
    metrics = MetricRecord({"train-loss": float(loss.detach()), "num-examples": 60})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


def _audit_mod(protections: Protections, gate: bool, fraction: float = 1.0, data_fn=None):
    config = LeakageAuditConfig(
        plan=AuditPlan(training=LocalTraining(1, 1.0), protections=protections,
                       attacks=("idlg", "ig-prior"), effort=0.2, time_budget_s=60),
        sampling=AuditSampling(round_fraction=fraction, client_fraction=1.0),
        gate=gate, device="cpu",
    )
    return leakage_audit_mod(_model, data_fn or (lambda ctx: (IMAGES.numpy(), LABELS.numpy())), config)


def test_audit_mod_reports_scores_with_fixed_keys() -> None:
    msg = _train_message()
    reply = _audit_mod(Protections(), gate=False)(msg, _context(), _train)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert set(neutral_metrics()) <= set(metrics.keys())
    assert metrics["audit-ran"] == 1 and metrics["audit-leaks"] == 1
    assert metrics["audit-psnr-gain-db"] > 10
    assert metrics["train-loss"] > 0  # the app's own metrics are kept
    # Not sampled: the same keys, neutral values; the arrays untouched.
    quiet = _audit_mod(Protections(), gate=True, fraction=0.0)(msg, _context(), _train)
    assert set(quiet.content["metrics"].keys()) == set(metrics.keys())
    assert quiet.content["metrics"]["audit-ran"] == 0
    assert all(not isinstance(v, list) for v in metrics.values())  # scores only


def test_gate_blocks_a_leaking_update_and_lets_a_protected_one_through() -> None:
    msg = _train_message()
    blocked = _audit_mod(Protections(), gate=True)(msg, _context(), _train)
    assert blocked.has_error()
    assert blocked.error.reason.startswith(BLOCKED_REASON)
    assert "identified" in blocked.error.reason
    dp = Protections(clipping_norm=1.0, noise_multiplier=1.0)
    sent = _audit_mod(dp, gate=True)(msg, _context(), _train)
    assert not sent.has_error()
    assert sent.content["metrics"]["audit-leaks"] == 0


def test_an_audit_that_cannot_run_refuses_by_default_and_sends_only_when_told() -> None:
    def broken(ctx):
        return np.zeros((1, 8, 8)), np.zeros(1)  # too few samples for an audit

    trained = []

    def train(msg, context):
        trained.append(True)
        return _train(msg, context)

    refused = _audit_mod(Protections(), gate=True, data_fn=broken)(_train_message(), _context(), train)
    assert refused.has_error()
    assert refused.error.reason.startswith(f"{POLICY_REFUSAL} leakage audit failed: round 3")
    assert "needs at least 2" in refused.error.reason and "on_failure='send'" in refused.error.reason
    config = LeakageAuditConfig(plan=AuditPlan(attacks=("idlg",), effort=0.1),
                                sampling=AuditSampling(1.0, 1.0), on_failure="send", device="cpu")
    reply = leakage_audit_mod(_model, broken, config)(_train_message(), _context(), _train)
    assert not reply.has_error()
    assert reply.content["metrics"]["audit-error"] == 1
    assert reply.content["metrics"]["audit-ran"] == 0
    # The node operator can force a refusal, never a send.
    forced = leakage_audit_mod(_model, broken, config)(
        _train_message(), Context(1, 7, {"audit-on-failure": "refuse"}, RecordDict(), {}), _train)
    assert forced.has_error() and "leakage audit failed" in forced.error.reason


def test_an_unsupported_model_or_batch_is_refused_before_training_with_its_shape() -> None:
    trained = []

    def train(msg, context):
        trained.append(True)
        return _train(msg, context)

    wrong = _audit_mod(Protections(), gate=False, fraction=0.0,
                       data_fn=lambda ctx: {"pixels": IMAGES, "y": LABELS})
    reply = wrong(_train_message(), _context(), train)
    assert reply.has_error() and trained == []  # refused before training, round not sampled
    assert "the audit cannot run on this app" in reply.error.reason
    assert "keys ['pixels', 'y']" in reply.error.reason
    flat = _audit_mod(Protections(), gate=False, fraction=0.0,
                      data_fn=lambda ctx: (IMAGES.reshape(len(IMAGES), -1), LABELS))
    reply = flat(_train_message(), _context(), train)
    assert reply.has_error() and trained == []
    assert "cannot run on the audit's inputs Tensor(torch.float32, (2, 64))" in reply.error.reason


def test_evaluate_messages_are_left_alone() -> None:
    msg = _instruction(RecordDict({"arrays": ArrayRecord(_model().state_dict())}), kind="evaluate")

    def evaluate(m, c):
        return Message(RecordDict({"metrics": MetricRecord({"eval-loss": 1.0})}), reply_to=m)

    reply = _audit_mod(Protections(), gate=True)(msg, _context(), evaluate)
    assert list(reply.content["metrics"].keys()) == ["eval-loss"]


def _with_metrics(extra: dict) -> callable:
    def train(msg, context):
        reply = _train(msg, context)
        for key, value in extra.items():
            reply.content["metrics"][key] = value
        return reply
    return train


def test_inspection_mod_blocks_per_example_losses() -> None:
    msg = _train_message()
    mod = reply_inspection_mod()
    leaky = mod(msg, _context(), _with_metrics({"per-example-loss": [0.1] * 60}))
    assert leaky.has_error() and leaky.error.reason.startswith(INSPECTION_BLOCKED)
    assert "per-example-metric" in leaky.error.reason and "0.1" not in leaky.error.reason
    assert not mod(msg, _context(), _train).has_error()
    flagged = reply_inspection_mod("flag")(msg, _context(), _with_metrics({"losses": [0.1, 0.2]}))
    assert not flagged.has_error()

    def extra_array(m, c):
        reply = _train(m, c)
        reply.content["grads"] = ArrayRecord({"g": Array(np.zeros((60, 10), dtype=np.float32))})
        return reply

    assert mod(msg, _context(), extra_array).has_error()


def test_inspector_findings() -> None:
    declared = {"w": ((3, 2), "float32"), "b": ((3,), "float32")}
    clean = {"arrays": {"w": ((3, 2), "float32"), "b": ((3,), "float32")}}
    ok_metrics = {"metrics": {"train-loss": 0.3, "num-examples": 10, "audit-psnr-db": 12.0,
                              "grad-norm": 1.2}}
    assert inspect_reply(declared, clean, ok_metrics) == []
    kinds = lambda found: sorted({f.kind for f in found})  # noqa: E731
    bad_arrays = {"arrays": {"w": ((2, 3), "float32"), "b": ((3,), "float64"), "x": ((10, 64), "float32")}}
    assert kinds(inspect_reply(declared, bad_arrays, {})) == [
        "dtype-mismatch", "shape-mismatch", "undeclared-array"]
    metrics = {"metrics": {**{f"loss-{i}": 0.1 for i in range(20)},
                           "sample-grads": [0.0] * 4, "batch-norms": list(range(40))}}
    assert kinds(inspect_reply(declared, clean, metrics)) == [
        "high-cardinality-metric", "numbered-metrics", "per-example-metric"]
    assert kinds(inspect_reply(declared, clean, {"metrics": {"grads": [0.1, 0.2]}})) == ["gradient-metric"]
    assert kinds(inspect_reply(None, clean, {}, {"config": {"k": "v"}})) == [
        "array-records", "config-record"]


def _reply_to(node: int, content: RecordDict) -> Message:
    return Message(content, reply_to=_train_message(node))


def test_reply_guard_drops_offending_replies_before_fedavg() -> None:
    global_arrays = ArrayRecord(_model().state_dict())
    clean = _train(_train_message(1), _context(1))
    leaky = _with_metrics({"per-sample-loss": [0.5] * 60})(_train_message(2), _context(2))
    guard = ReplyGuard(FedAvg())
    guard.declare(3, global_arrays)
    arrays, metrics = guard.aggregate_train(3, [clean, leaky])
    assert guard.blocked[3] == [2]
    assert {f.kind for _, f in guard.findings[3]} == {"per-example-metric", "high-cardinality-metric"}
    # FedAvg saw only the clean reply: its arrays are the aggregate.
    for key, value in clean.content["arrays"].items():
        np.testing.assert_allclose(arrays[key].numpy(), value.numpy(), rtol=1e-6)
    assert "per-sample-loss" not in metrics
    # Without the guard the extra key would abort FedAvg's consistency check.
    from flwr.serverapp.exception import InconsistentMessageReplies

    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(3, [clean, leaky])


def test_audit_summary_reports_the_worst_case_and_the_blocked() -> None:
    msg = _train_message(1)
    audited = _audit_mod(Protections(), gate=False)(msg, _context(1), _train)
    quiet = _audit_mod(Protections(), gate=False, fraction=0.0)(_train_message(2), _context(2), _train)
    blocked = _audit_mod(Protections(), gate=True)(_train_message(3), _context(3), _train)
    summary = AuditSummary(FedAvg())
    arrays, metrics = summary.aggregate_train(3, [audited, quiet, blocked])
    assert arrays is not None
    assert metrics["audit-ran"] == 1 and metrics["audit-leaks"] == 1
    assert metrics["audit-blocked"] == 1
    assert metrics["audit-psnr-db"] == pytest.approx(audited.content["metrics"]["audit-psnr-db"])
    assert summary.worst()["round"] == 3
    # Every reply blocked: the round still aggregates to "no update" without crashing.
    arrays, metrics = summary.aggregate_train(4, [blocked])
    assert arrays is None and metrics["audit-blocked"] == 1


def test_no_audit_metrics_without_an_audit_and_errors_counted_with_one() -> None:
    plain = [_train(_train_message(n), _context(n)) for n in (1, 2)]
    summary = AuditSummary(FedAvg())
    _, metrics = summary.aggregate_train(1, plain)
    assert not [k for k in metrics if k.startswith("audit-")]  # no audit: no audit-* keys
    assert summary.worst() is None

    def broken(ctx):
        return np.zeros((1, 8, 8)), np.zeros(1)

    config = LeakageAuditConfig(plan=AuditPlan(attacks=("idlg",), effort=0.1),
                                sampling=AuditSampling(1.0, 1.0), on_failure="send", device="cpu")
    failed = leakage_audit_mod(_model, broken, config)(_train_message(3), _context(3), _train)
    refused = _audit_mod(Protections(), gate=False, data_fn=broken)(
        _train_message(4), _context(4), _train)
    quiet = _audit_mod(Protections(), gate=False, fraction=0.0)(_train_message(5), _context(5), _train)
    _, metrics = summary.aggregate_train(2, [quiet, failed, refused])
    assert metrics["audit-error"] == 2 and metrics["audit-ran"] == 0


def test_protections_announced_by_the_server_override_the_declared_ones() -> None:
    from flwr_guard.audit.audit_mod import protections_in_force

    msg = _instruction(RecordDict({
        "arrays": ArrayRecord(_model().state_dict()),
        "config": ConfigRecord({"server-round": 1, "dp-clipping-norm": 0.5,
                                "dp-noise-multiplier": 0.8}),
    }))
    found = protections_in_force(msg, Protections(aggregate_size=4))
    assert (found.clipping_norm, found.noise_multiplier, found.aggregate_size) == (0.5, 0.8, 4)
    plain = protections_in_force(_train_message(), Protections(clipping_norm=2.0))
    assert (plain.clipping_norm, plain.noise_multiplier) == (2.0, 0.0)


def test_an_audit_refusal_counts_as_an_audit_error_in_telemetry() -> None:
    from prometheus_client import generate_latest

    from flwr_guard.telemetry.metrics import GuardMetrics
    from flwr_guard.telemetry.recorder import ReplyView, TelemetryRecorder

    metrics = GuardMetrics()
    recorder = TelemetryRecorder(metrics, "7", "FedAvg")
    recorder.replies([
        ReplyView(1, False, {}, error=f"{POLICY_REFUSAL} leakage audit failed: round 2: "
                                      "ValueError: ..."),
        ReplyView(2, True, {"audit-ran": 1, "audit-psnr-db": math.nan, "audit-token-f1": 1.0}),
    ])
    text = generate_latest(metrics.registry).decode()
    line = [x for x in text.splitlines() if x.startswith("flwr_guard_audit_errors_total")]
    assert line and float(line[0].split()[-1]) == 1.0
    counts = [float(x.split()[-1]) for x in text.splitlines()
              if x.startswith("flwr_guard_audit_psnr_decibels_count")]
    assert all(c == 0.0 for c in counts)  # NaN: not applicable, never observed
