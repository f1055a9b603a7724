"""The node-local round ledger (flwr_guard.secagg.round_ledger): a node whose saved
state is rolled back to before a round's input never masks that round twice, through
the core and the real mod, in both modes (docs/secagg.md, "Storage rollback")."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import stat
import time

import numpy as np
import pytest
from secagg_harness import ModFederation, run_strategy_rounds
from test_secagg_session import Session, expected

from flwr_guard.secagg import codec, round_ledger
from flwr_guard.secagg.constants import SECAGG_RECORD, UNKNOWN_SESSION
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.keys import write_federation
from flwr_guard.secagg.round_ledger import RoundLedger
from flwr_guard.secagg.session_client import SessionClient

KEY_A, KEY_B = b"a" * 32, b"b" * 32
NODE = 7
T0 = 1_000.0  # opening times (seconds)
MODEL = b"m" * 32


def test_the_ledger_is_monotonic_per_key_and_survives_a_new_instance(tmp_path):
    path = tmp_path / "rounds.json"
    ledger = RoundLedger(path, NODE)
    assert ledger.last(KEY_A) == -1  # first use
    ledger.advance(KEY_A, 3, T0)
    ledger.advance(KEY_B, 1, T0)
    for r in (3, 2):
        with pytest.raises(ProtocolError, match="records an input for round 3"):
            RoundLedger(path, NODE).advance(KEY_A, r, T0)
        with pytest.raises(ProtocolError, match="records an input for round 3"):
            RoundLedger(path, NODE).check(KEY_A, r, T0)
    assert RoundLedger(path, NODE).last(KEY_A) == 3 and RoundLedger(path, NODE).last(KEY_B) == 1
    RoundLedger(path, NODE).advance(KEY_A, 4, T0)
    data = json.loads(path.read_text())
    assert data["rounds"][f"{NODE}:{KEY_A.hex()}"] == [4, T0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rounds.json", "rounds.json.lock"]  # no temp left


def test_a_corrupt_or_unwritable_ledger_refuses_with_its_path(tmp_path, monkeypatch):
    path = tmp_path / "rounds.json"
    path.write_text("{not json")
    with pytest.raises(ProtocolError, match=f"round ledger {path} is unreadable"):
        RoundLedger(path, NODE).last(KEY_A)
    path.write_text(json.dumps({"version": 2, "forgotten_before": None, "rounds": {"x": "2"}}))
    with pytest.raises(ProtocolError, match="unexpected layout"):
        RoundLedger(path, NODE).advance(KEY_A, 1, T0)
    with pytest.raises(ProtocolError, match="cannot be written"):
        RoundLedger(tmp_path / "missing-dir" / "rounds.json", NODE).advance(KEY_A, 1, T0)
    good = tmp_path / "good.json"
    for opened in (float("nan"), float("inf")):  # a corrupt state never bricks the file
        with pytest.raises(ProtocolError, match="is not a finite number"):
            RoundLedger(good, NODE).advance(KEY_A, 1, opened)
    assert not good.exists()


def test_a_version_1_ledger_forgets_into_its_horizon(tmp_path):
    """A version-1 file has no node ids: its entries are dropped and every context opened
    before its last write is refused (not accepted as new); later ones are recorded."""
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps({"version": 1, "rounds": {KEY_A.hex(): 3}}))
    os.utime(path, (T0, T0))
    with pytest.raises(ProtocolError, match="forgotten the sessions and round contexts opened before 1000.000"):
        RoundLedger(path, NODE).advance(KEY_A, 3, T0)
    RoundLedger(path, NODE).advance(KEY_A, 4, T0 + 1)
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["forgotten_before"] == T0


def test_the_ledger_keeps_the_newest_entries_and_forgets_nothing_silently(tmp_path, monkeypatch):
    """Beyond MAX_ENTRIES the key written longest ago is dropped and the horizon rises to
    its opening time: that key (or any context opened no later) is refused, with the
    UNKNOWN_SESSION prefix (the server re-keys); a context opened after it is accepted."""
    monkeypatch.setattr(round_ledger, "MAX_ENTRIES", 3)
    ledger = RoundLedger(tmp_path / "rounds.json", NODE)
    for i in range(5):
        ledger.advance(bytes([i]) * 32, 1, T0 + i)
    data = json.loads((tmp_path / "rounds.json").read_text())
    assert list(data["rounds"]) == [f"{NODE}:" + bytes([i]).hex() * 32 for i in (2, 3, 4)]
    assert data["forgotten_before"] == T0 + 1
    for forgotten in (0, 1):
        with pytest.raises(ProtocolError, match="^" + re.escape(UNKNOWN_SESSION) + ": input for round 1 refused: .*forgotten"):
            ledger.check(bytes([forgotten]) * 32, 1, T0 + forgotten)
    ledger.advance(bytes([9]) * 32, 5, T0 + 1.5)  # opened after the horizon: a new context
    ledger.advance(bytes([4]) * 32, 2, T0 + 4)  # a held key: its round decides


@pytest.mark.parametrize("evict", [False, True], ids=["control", "after-eviction"])
def test_a_server_cannot_evict_a_live_session_from_the_round_ledger(tmp_path, monkeypatch, evict):
    """Review of 68fc417: every per-round context and every re-key adds a key, all chosen
    by the server; MAX_ENTRIES of them used to push a live session's entry out, and a
    rolled-back node then answered the round again. Now the dropped entry raises the
    horizon to its opening time and the restored session (same opening time) is refused.
    The control: no eviction, refused by the held entry."""
    monkeypatch.setattr(round_ledger, "MAX_ENTRIES", 8)
    s = Session(n=8)
    u = s.ids[0]
    s.open(u)
    ledger = RoundLedger(tmp_path / "rounds.json", u)
    s.clients[u].ledger = ledger
    s.round(1)
    snapshot = codec.encode(s.clients[u].to_state())
    replies, _ = s.inputs(2, s.ids)
    s.finish(replies)
    if evict:
        for i in range(round_ledger.MAX_ENTRIES):
            ctx = dataclasses.replace(s.context, multi_round=False, model_hash=i.to_bytes(32, "big"))
            ledger.advance(ctx.digest(), ctx.server_round, time.time())
        assert ledger.last(s.clients[u].digest) == -1  # the entry itself is gone
    restored = SessionClient.from_state(codec.decode(snapshot), s.secrets[u], s.policy)
    restored.ledger = RoundLedger(tmp_path / "rounds.json", u)
    match = "forgotten the sessions" if evict else "records an input for round 2"
    with pytest.raises(ProtocolError, match=match):
        restored.masked_input(2, MODEL, *s.updates(2)[u], rng=np.random.default_rng(9))
    assert restored.last_round == 1


def test_two_nodes_given_one_ledger_file_keep_apart(tmp_path):
    """Review of 68fc417: the key was the session digest, the same on every member, so two
    nodes given one file (one volume and one node config in a template) refused each
    other's rounds. Now the key names the node: both answer, each node's replay is still
    refused. (The control: the same node id is refused, as before.)"""
    path = tmp_path / "shared.json"
    RoundLedger(path, 1).advance(KEY_A, 1, T0)
    RoundLedger(path, 2).advance(KEY_A, 1, T0)  # the other member of the same session
    for node in (1, 2):
        with pytest.raises(ProtocolError, match="records an input for round 1"):
            RoundLedger(path, node).advance(KEY_A, 1, T0)
    assert RoundLedger(path, 1).last(KEY_A) == RoundLedger(path, 2).last(KEY_A) == 1
    assert RoundLedger(path, 3).last(KEY_A) == -1
    # two members of one session (the same session digest), one file: a whole round runs
    s = Session(n=8)
    for c in s.ids:
        s.open(c)
    a, b = s.ids[0], s.ids[1]
    for c in (a, b):
        s.clients[c].ledger = RoundLedger(tmp_path / "session.json", c)
    total, _, u3, plain = s.round(1)
    assert {a, b} <= set(u3)
    np.testing.assert_array_equal(total, expected(plain, u3)[0])


def test_the_ledger_follows_no_symlink_and_needs_an_absolute_path(tmp_path):
    """Review of 68fc417: the fixed temp name was opened with O_CREAT|O_TRUNC through a
    symlink (the positive control: such a write clobbers the target). Now the temp file
    is a fresh mkstemp name, a symlinked lock file is refused, and a relative path too."""
    victim = tmp_path / "other-file"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "rounds.json.tmp")  # the old fixed temp name
    with open(tmp_path / "rounds.json.tmp", "w") as control:  # what the old write did
        control.write("{}")
    assert victim.read_text() == "{}"
    victim.write_text("precious\n")
    RoundLedger(tmp_path / "rounds.json", NODE).advance(KEY_A, 1, T0)
    assert victim.read_text() == "precious\n" and not (tmp_path / "rounds.json").is_symlink()
    assert stat.S_IMODE((tmp_path / "rounds.json.lock").stat().st_mode) == 0o600
    other = tmp_path / "b"
    other.mkdir()
    os.symlink(victim, other / "rounds.json.lock")
    with pytest.raises(ProtocolError, match=r"cannot be written: its lock file .*rounds.json.lock cannot be opened \(a symlink there is refused\)"):
        RoundLedger(other / "rounds.json", NODE).advance(KEY_A, 1, T0)
    assert victim.read_text() == "precious\n" and not (other / "rounds.json").exists()
    with pytest.raises(ProtocolError, match="'rounds.json' is relative: set node config secagg-round-ledger"):
        RoundLedger("rounds.json", NODE)


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


def test_write_federation_gives_each_node_its_own_round_ledger(tmp_path, monkeypatch):
    """On by default where the federation is written (the demo's nodes, the node-guard
    deployments): one absolute path per node, next to its key; off on request."""
    monkeypatch.chdir(tmp_path)
    configs = write_federation("fed", 3)  # a relative directory still gives absolute paths
    paths = [c["secagg-round-ledger"] for c in configs]
    assert paths == [str(tmp_path / "fed" / f"supernode-{i}.rounds.json") for i in range(3)]
    for i, path in enumerate(paths):
        RoundLedger(str(path), i).advance(KEY_A, 1, T0)  # usable as is
    assert all("secagg-round-ledger" not in c for c in write_federation("fed2", 2, round_ledgers=False))
