"""The node-local round ledger (flwr_guard.secagg.round_ledger): a node whose saved
state is rolled back to before a round's input never masks that round twice, through
the core and the real mod, in both modes (docs/secagg.md, "Storage rollback")."""

from __future__ import annotations

import copy
import json

import pytest
from secagg_harness import ModFederation, run_strategy_rounds

from flwr_guard.secagg import round_ledger
from flwr_guard.secagg.constants import SECAGG_RECORD
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.round_ledger import RoundLedger

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def test_the_ledger_is_monotonic_per_key_and_survives_a_new_instance(tmp_path):
    path = tmp_path / "rounds.json"
    ledger = RoundLedger(path)
    assert ledger.last(KEY_A) == -1  # first use
    ledger.advance(KEY_A, 3)
    ledger.advance(KEY_B, 1)
    for r in (3, 2):
        with pytest.raises(ProtocolError, match="records an input for round 3"):
            RoundLedger(path).advance(KEY_A, r)
    assert RoundLedger(path).last(KEY_A) == 3 and RoundLedger(path).last(KEY_B) == 1
    RoundLedger(path).advance(KEY_A, 4)
    assert json.loads(path.read_text())["rounds"][KEY_A.hex()] == 4


def test_a_corrupt_or_unwritable_ledger_refuses_with_its_path(tmp_path, monkeypatch):
    path = tmp_path / "rounds.json"
    path.write_text("{not json")
    with pytest.raises(ProtocolError, match=f"round ledger {path} is unreadable"):
        RoundLedger(path).last(KEY_A)
    path.write_text(json.dumps({"version": 1, "rounds": {"x": "2"}}))
    with pytest.raises(ProtocolError, match="unexpected layout"):
        RoundLedger(path).advance(KEY_A, 1)
    with pytest.raises(ProtocolError, match="cannot be written"):
        RoundLedger(tmp_path / "missing-dir" / "rounds.json").advance(KEY_A, 1)


def test_the_ledger_keeps_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(round_ledger, "MAX_ENTRIES", 3)
    ledger = RoundLedger(tmp_path / "rounds.json")
    for i in range(5):
        ledger.advance(bytes([i]) * 32, 1)
    kept = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert list(kept) == [bytes([i]).hex() * 32 for i in (2, 3, 4)]


@pytest.mark.parametrize("multi_round", [True, False], ids=["session", "per-round"])
@pytest.mark.parametrize("ledger", [False, True], ids=["no-ledger", "round-ledger"])
def test_mod_a_rolled_back_node_never_answers_a_round_twice(tmp_path, multi_round, ledger):
    """Node u's ``context.state`` is snapshotted just before its round-2 input; after
    the round it is restored and the same round-2 instruction replayed to the real mod.
    Without a ledger the mod masks a second round-2 input (the positive control: the
    attack of the strict xfail this replaces); with one it refuses, naming the ledger."""
    fed = ModFederation(5, tmp_path)
    u = fed.ids[1]
    if ledger:
        for j, node in enumerate(fed.ids):
            fed.contexts[node].node_config["secagg-round-ledger"] = str(tmp_path / f"rounds{j}.json")
    saved: dict = {}

    def snapshot(stage, node, msg):
        record = msg.content.config_records[SECAGG_RECORD]
        if node == u and stage == "masked-input" and int(record["server-round"]) == 2:
            saved["state"] = copy.deepcopy(fed.contexts[u].state)
            saved["msg"] = copy.deepcopy(msg)
        return msg

    fed.tamper = snapshot
    results = run_strategy_rounds(fed, 2, multi_round=multi_round)
    assert all(report.aborted is None for _, report in results)
    from flwr_guard.secagg.mod import secaggplus_mod

    fed.contexts[u].state = saved["state"]  # the rollback
    reply = secaggplus_mod(saved["msg"], fed.contexts[u], fed._train)
    if ledger:
        assert reply.has_error() and "round ledger records an input for" in reply.error.reason
    else:
        assert not reply.has_error()  # a second round-2 input under the same masks
