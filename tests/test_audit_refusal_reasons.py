"""The clients' own refusal reasons reach the server's log and GuardMismatch: a cohort
below the node's floor, no federation roster, an exhausted budget (with its numbers);
the generic hint only when no reason came back."""

from __future__ import annotations

import logging

import pytest
from guard_attack_helpers import app, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.dp.budget import PrivacyBudgetExceeded
from flwr_guard.guard import ClientPolicy, GuardMismatch
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.refusal_reasons import GENERIC_HINT, reason_from_text, stops_run
from flwr_guard.guard.strategy import GuardedStrategy, NoAggregate, SecAgg

BUDGET = ("record-level privacy budget exhausted: this round (10 DP-SGD steps at sample "
          "rate 0.01) would bring epsilon from 7.9 to 8.31 > max epsilon 8 at delta 1e-05")


def _guarded(nodes, node_config=None, fn=None):
    guard = ClientGuard(ClientPolicy(secagg=True))
    return LoopbackGrid({n: app(guard.train_mods(), fn=fn) for n in nodes},
                        node_config=node_config)


def test_reason_extraction_from_flower_error_texts() -> None:
    flower = f"<class 'flwr_guard.dp.budget.PrivacyBudgetExceeded'>:<'{BUDGET}'>"
    assert reason_from_text(flower) == f"PrivacyBudgetExceeded: {BUDGET}"
    assert reason_from_text(f"PrivacyBudgetExceeded: {BUDGET}") == f"PrivacyBudgetExceeded: {BUDGET}"
    assert reason_from_text("flwr-guard policy refused: trap model: x") == "trap model: x"
    assert reason_from_text("SecAgg+ refused: cohort 2 < 3") == "SecAgg+ refused: cohort 2 < 3"
    assert reason_from_text("<class 'ZeroDivisionError'>:<'division by zero'>") is None
    # The audit gate and the reply inspector are not refusals of the server.
    assert reason_from_text("flwr-guard audit: update blocked (round 2): ...") is None


def test_which_refusals_stop_the_run() -> None:
    assert stops_run("trap model: ...", "masked-input")  # a policy refusal, any stage
    assert stops_run("LedgerMissing: ...", None)
    assert not stops_run("PrivacyBudgetExceeded: ...", None)  # the budget doing its job
    assert stops_run("SecAgg+ refused: the server announced a cohort of 2 ...", "advertise")
    # After the set-up a SecAgg+ error also wraps inner crashes and lost sessions.
    assert not stops_run("SecAgg+ refused: unsupported operand", "masked-input")
    assert not stops_run("SecAgg+ refused: no usable SecAgg+ session on this client", "roster")


def test_a_cohort_below_the_floor_names_the_floor_on_the_server(caplog) -> None:
    grid = _guarded((11, 12), node_config={11: {"secagg-min-cohort": 3},
                                           12: {"secagg-min-cohort": 3}})
    with caplog.at_level(logging.ERROR), pytest.raises(GuardMismatch) as raised:
        GuardedStrategy(fedavg(2), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)
    message = str(raised.value)
    assert "2 of 2 clients refused" in message and "SecAgg+ refused:" in message
    assert "3" in message.split("Their reasons:")[1]  # the floor itself
    assert GENERIC_HINT not in message
    assert "aborted at advertise" in message
    assert any("node 11 refused: SecAgg+ refused" in r.getMessage() for r in caplog.records)


def test_no_roster_is_the_reason_given(caplog) -> None:
    grid = _guarded((11, 12, 13), node_config={
        n: {"secagg-trust-on-first-use": False} for n in (11, 12, 13)})
    with pytest.raises(GuardMismatch) as raised:
        GuardedStrategy(fedavg(3), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)
    assert "roster" in str(raised.value).split("Their reasons:")[1]
    assert GENERIC_HINT not in str(raised.value)


def test_an_exhausted_budget_reaches_the_server_with_its_numbers() -> None:
    def exhausted(msg, context):
        raise PrivacyBudgetExceeded(BUDGET)

    grid = _guarded((11, 12, 13), fn=exhausted)
    with pytest.raises(NoAggregate) as raised:  # not a mismatch: the run ends without an aggregate
        GuardedStrategy(fedavg(3), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)
    message = str(raised.value)
    assert "PrivacyBudgetExceeded: record-level privacy budget exhausted" in message
    assert "epsilon from 7.9 to 8.31 > max epsilon 8" in message


def test_the_generic_hint_only_without_a_reason() -> None:
    grid = LoopbackGrid({n: app([]) for n in (11, 12, 13)})  # no guard at all
    with pytest.raises(NoAggregate, match=r"do the clients run ClientGuard\(\.\.\.\)\.train_mods\(\)\?"):
        GuardedStrategy(fedavg(3), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)


def test_the_round_line_shows_audit_errors_and_the_clients_reasons() -> None:
    from types import SimpleNamespace

    from flwr_guard.guard.round_log import describe_round

    audit = SimpleNamespace(rounds={1: {"audit-ran": 0, "audit-error": 2, "audit-leaks": 0}})
    line = describe_round(1, [], True, audit=audit)
    assert "audit: 0 of 0 audited updates leak, 2 audit error(s)" in line
    secagg = SimpleNamespace(history=[SimpleNamespace(server_round=1, aborted="aborted at advertise",
                                                      cohort=2)])
    line = describe_round(1, [], False, secagg=secagg,
                          refusals={11: "SecAgg+ refused: cohort 2 < 3"})
    assert "the clients said: SecAgg+ refused: cohort 2 < 3" in line and GENERIC_HINT not in line
    assert GENERIC_HINT in describe_round(1, [], False, secagg=secagg, refusals={})
