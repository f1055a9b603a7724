"""One client's metrics of the wrong shape or type never end the run under GuardedStrategy:
a list metric of another length than the others' (Flower's FedAvg zips lists), an audit
count that is a list or infinite (AuditSummary), a list where DPFedAvg needs a count. Each
reply is left out with a logged reason; the positive controls show the same replies
ending the run without the guard."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from test_dp_strategy import _Nodes

from flwr_guard.guard.strategy import CentralDP, GuardedStrategy
from flwr_guard.keys import ReplyMetrics


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None


def _fedavg(n: int) -> FedAvg:
    return FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_train=1.0,
                  min_evaluate_nodes=n, fraction_evaluate=1.0)


def _replies(strategy, n: int, metrics_of, train: bool = True) -> list[Message]:
    init = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    configure = strategy.configure_train if train else strategy.configure_evaluate
    out = []
    for i, msg in enumerate(configure(1, init, ConfigRecord(), _Nodes(n))):
        content = {"metrics": MetricRecord(metrics_of(i))}
        if train:
            content["arrays"] = ArrayRecord({"w": Array(np.ones(4, np.float32))})
        out.append(Message(content=RecordDict(content), reply_to=msg))
    return out


def _list_lengths(i: int) -> dict:
    return {"num-examples": 1, "acc": [1.0] if i else [1.0, 2.0, 3.0]}


def test_a_list_metric_of_another_length_is_left_out_on_train_and_evaluate(caplog) -> None:
    strategy = GuardedStrategy(_fedavg(3))
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, 3, _list_lengths))
    assert arrays is not None and metrics["acc"] == [1.0]
    assert "differ in name or list length" in caplog.text
    evaluated = strategy.aggregate_evaluate(1, _replies(strategy, 3, _list_lengths, train=False))
    assert evaluated is not None and evaluated["acc"] == [1.0]


def test_positive_control_flowers_fedavg_alone_fails_on_those_replies() -> None:
    plain = _fedavg(3)
    with pytest.raises(ValueError, match="zip"):
        plain.aggregate_train(1, _replies(plain, 3, _list_lengths))


@pytest.mark.parametrize("bad", [[1.0], float("inf"), -1])
def test_an_odd_audit_count_is_left_out_not_a_crash(bad, caplog) -> None:
    strategy = GuardedStrategy(_fedavg(3))
    replies = _replies(strategy, 3, lambda i: {"num-examples": 1, ReplyMetrics.AUDIT_ERROR: bad if i == 0 else 0,
                                               ReplyMetrics.AUDIT_LEAKS: 0})
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None  # the round aggregated; that reply's audit metrics are out
    # A list differs in layout from the others' numbers (left out before AuditSummary);
    # an infinite or negative count is refused by AuditSummary's parse.
    assert ("audit metrics of node" in caplog.text) != ("differ in name or list length" in caplog.text)


def test_a_list_where_dpfedavg_needs_a_count_drops_that_reply(caplog, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    strategy = GuardedStrategy(_fedavg(1), audit_summary=False,
                               dp=CentralDP(noise_multiplier=1.0, clipping_norm=1.0, expected_contributors=2,
                                            options={"checkpoint": None}))
    replies = _replies(strategy, 1, lambda i: {"num-examples": 5.0, ReplyMetrics.DP_CLIPPED_COUNT: [5.0]})
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert "must be a number, got list" in caplog.text
