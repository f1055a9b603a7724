"""Tolerance of lost and bad clients (issue 20, items 2-4), through the real strategy
and mods (tests/secagg_harness.py), per-round and multi-round sessions.

- 1..k-t clients lost at each stage, the roster stage included: the round completes
  with the exact weighted mean of the survivors (docs/secagg.md, "Tolerance").
- one bad client per stage (a random nonce, a share that does not open, an all-zero
  masked vector, a wrong self-mask commitment, a wrong pair seed): excluded or named,
  and the round completes (a provably wrong pair seed: after the recovery stage).
- a session that lost more than its graph tolerates re-keys with the survivors.
- GuardedStrategy: one client's odd reply (an extra metric key, an array without data)
  under central DP without SecAgg+ is left out; the run goes on.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord
from secagg_harness import ModFederation, run_strategy_rounds

from flwr_guard.secagg import codec
from flwr_guard.secagg.constants import SECAGG_RECORD
from flwr_guard.secagg.params import SecAggParams

N = 7  # defaults for 7: k = 5, t = 3 (k - t = 2 losses tolerated per neighbourhood)
STEP = SecAggParams(5, 3).step
PER_ROUND_STAGES = ("advertise", "roster", "share-keys", "masked-input", "consistency", "unmask")
SESSION_STAGES = ("advertise", "roster", "masked-input", "consistency", "unmask")
ORDER = ("advertise", "roster", "share-keys", "masked-input", "consistency", "unmask")


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR)


def lose(fed: ModFederation, gone: set[int], stage: str):
    """``gone`` stop answering at ``stage`` and after (a node killed there)."""
    def tamper(s, node, msg):
        return None if node in gone and ORDER.index(s) >= ORDER.index(stage) else msg
    return tamper


def in_sum(fed: ModFederation, gone: set[int], stage: str) -> list[int]:
    """Whose input is in the sum: a node lost after sending its input still counts."""
    after_input = ORDER.index(stage) > ORDER.index("masked-input")
    return list(fed.ids) if after_input else [i for i in fed.ids if i not in gone]


def tolerance_row(tmp_path, multi_round: bool, stage: str, losses: int) -> tuple[bool, int]:
    """One round with ``losses`` nodes lost at ``stage``: (exact mean released, survivors)."""
    fed = ModFederation(N, tmp_path, seed=5)
    gone = set(fed.ids[1:1 + losses])
    fed.tamper = lose(fed, gone, stage)
    ((agg, report),) = run_strategy_rounds(fed, 1, multi_round=multi_round)
    if agg is None:
        return False, 0
    expected = fed.expected_mean(in_sum(fed, gone, stage))
    return bool(np.abs(agg - expected).max() < STEP), report.survivors


@pytest.mark.parametrize("multi_round", [False, True])
@pytest.mark.parametrize("losses", [1, 2])
def test_up_to_k_minus_t_losses_at_every_stage_give_the_exact_survivor_mean(tmp_path, multi_round, losses):
    for stage in PER_ROUND_STAGES if not multi_round else SESSION_STAGES:
        (tmp_path / stage).mkdir()
        exact, survivors = tolerance_row(tmp_path / stage, multi_round, stage, losses)
        assert exact, (stage, losses)
        assert survivors == (N if ORDER.index(stage) > ORDER.index("masked-input") else N - losses)


# -- one bad client --------------------------------------------------------------------
class BadReplies(ModFederation):
    """``edit(stage, reply)`` rewrites the replies of node ``bad`` (a misbehaving client)."""

    def __init__(self, n, tmp_path, seed=0):
        super().__init__(n, tmp_path, seed=seed)
        self.bad = self.ids[1]
        self.edit = None
        self.tmp = tmp_path

    def deliver(self, msg):
        reply = super().deliver(msg)
        if reply is None or reply.has_error() or msg.metadata.dst_node_id != self.bad or self.edit is None:
            return reply
        return self.edit(str(msg.content.config_records[SECAGG_RECORD]["stage"]), reply)


def payload_edit(stage_wanted: str, change):
    def edit(stage, reply):
        if stage != stage_wanted:
            return reply
        payload = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
        if change(payload) is False:
            return reply
        reply.content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(payload)})
        return reply
    return edit


def random_first(name: str):
    def change(p):
        if name not in p:
            return False
        key = sorted(p[name])[0]
        p[name][key] = np.random.default_rng(1).bytes(len(p[name][key]))
    return change


def _zero_vector(stage, reply):
    from flwr.app import ArrayRecord

    from flwr_guard.secagg.constants import MASKED_ARRAYS

    if stage == "masked-input":
        (v,) = reply.content.array_records[MASKED_ARRAYS].to_numpy_ndarrays()
        reply.content[MASKED_ARRAYS] = ArrayRecord(numpy_ndarrays=[np.zeros_like(v)])
    return reply


def _set(name, value):
    def change(p):
        if name not in p:
            return False
        p[name] = value
    return change


def _signed_random_commitment(fed: BadReplies):
    """The bad client sends a random self-mask commitment and signs it with its own key
    (a colluding client; an unsigned change fails the input's signature instead)."""
    from flwr_guard.secagg import crypto
    from flwr_guard.secagg.constants import STATE_RECORD
    from flwr_guard.secagg.keys import load_signing_key
    from flwr_guard.secagg.transcripts import session_input_payload

    def edit(stage, reply):
        if stage != "masked-input":
            return reply
        payload = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
        payload["commitment"] = b"\x01" * 32
        state = fed.contexts[fed.bad].state.config_records[STATE_RECORD]
        digest = codec.decode(state["session"])["round"]["digest"]
        key = load_signing_key(str(fed.tmp / f"node{fed.ids.index(fed.bad)}.key"))
        pcs = {int(k): v for k, v in payload["pair_commitments"].items()}
        payload["input_signature"] = crypto.sign(key, session_input_payload(digest, fed.bad, payload["commitment"], pcs))
        reply.content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(payload)})
        return reply
    return edit


_signed_random_commitment.per_federation = True  # type: ignore[attr-defined]

BAD_CLIENTS = {
    # name: (modes, edit, survivors allowed)
    "random nonce": (("per-round", "session"), payload_edit("roster", _set("nonce", b"\x07" * 32)), {N - 1}),
    "missing nonce": (("per-round", "session"), payload_edit("roster", lambda p: p.clear()), {N - 1}),
    # The recipient reports it; the pair is disputed (which end lied is undecidable):
    # both are left out.
    "share to one peer that does not open": (("per-round",), payload_edit("share-keys", random_first("ciphertexts")), {N - 2}),
    "session share to one peer that does not open": (("session",), payload_edit("masked-input", random_first("ciphertexts")), {N}),
    "all-zero masked vector": (("per-round", "session"), _zero_vector, {N - 1}),
    "random self-mask commitment": (("session",), _signed_random_commitment, {N}),
    # Unsigned by its sender (the input's signature fails): left out at input.
    "unsigned random self-mask commitment": (("session",), payload_edit("masked-input", _set("commitment", b"\x01" * 32)), {N - 1}),
    "wrong self-mask share": (("per-round",), payload_edit("unmask", lambda p: [v.__setitem__(2, b"\x02" * 32) for v in p["shares"].values()]), {N}),
    "wrong self-mask seed": (("session",), payload_edit("unmask", _set("seed", b"\x03" * 32)), {N}),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIENTS))
def test_one_bad_client_is_excluded_and_the_round_completes(tmp_path, case):
    modes, edit, allowed = BAD_CLIENTS[case]
    for mode in modes:
        (tmp_path / mode).mkdir()
        fed = BadReplies(N, tmp_path / mode, seed=6)
        fed.edit = edit(fed) if getattr(edit, "per_federation", False) else edit
        ((agg, report),) = run_strategy_rounds(fed, 1, multi_round=mode == "session")
        assert report.aborted is None, (mode, report.aborted)
        assert report.survivors in allowed, (mode, report.survivors, report.excluded)
        sets = [fed.ids, [i for i in fed.ids if i != fed.bad]] + [
            [i for i in fed.ids if i not in (fed.bad, p)] for p in fed.ids]
        assert any(len(s) == report.survivors and np.abs(agg - fed.expected_mean(s)).max() < STEP
                   for s in sets), mode
        if report.survivors < N:
            assert str(fed.bad) in report.excluded


def test_a_wrong_pair_seed_names_the_culprit_and_the_round_completes_without_it(tmp_path):
    """A colluding client reveals (and signs) a wrong pair seed for a dropped neighbour:
    it is proven and named, its honest neighbours check the proof and reveal their pair
    seeds with it (``unmask-recover``), and the round releases the exact mean of the
    others; the next round leaves it out (tests/test_secagg_recover.py has the positive
    control without recovery and the framing attempts)."""
    from test_secagg_recover import Colluder

    fed = Colluder(N, tmp_path, seed=6)
    gone = fed.ids[4]  # an early dropout: its pair seeds are revealed by its neighbours
    fed.liar = fed.ids[1]
    fed.tamper = lambda s, node, msg: None if node == gone and s == "masked-input" else msg
    (agg1, r1), (agg2, r2) = run_strategy_rounds(fed, 2, multi_round=True)
    survivors = [i for i in fed.ids if i not in (fed.liar, gone)]
    assert f"node {gone}" in r1.excluded[str(fed.liar)]
    for agg, report in ((agg1, r1), (agg2, r2)):
        assert report.aborted is None and report.survivors == len(survivors)
        assert np.abs(agg - fed.expected_mean(survivors)).max() < STEP
    assert not r2.key_setup


# -- sessions: re-key after an abort -----------------------------------------------------
def test_a_session_that_lost_too_many_re_keys_with_the_survivors(tmp_path):
    """Three of seven killed after round 1 (more than k - t = 2 of some neighbourhood):
    round 2 aborts (nothing released), round 3 sets keys up again with the four that
    answer and gives their exact mean; before, the session was never re-keyed and the
    survivors trained and were excluded round after round."""
    fed = ModFederation(N, tmp_path, seed=7)
    dead = set(fed.ids[:3])
    kill = lambda s, node, msg: None if node in dead else msg  # noqa: E731
    results = run_strategy_rounds(fed, 4, tampers={2: kill, 3: kill, 4: kill}, multi_round=True)
    (_, r1), (agg2, r2), (agg3, r3), (agg4, r4) = results
    assert r1.aborted is None and r1.survivors == N
    alive = [i for i in fed.ids if i not in dead]
    assert agg2 is None and r2.aborted  # too many lost for the session's graph
    assert r3.key_setup  # before: never re-keyed, the survivors excluded every round
    for agg, report in ((agg3, r3), (agg4, r4)):
        assert report.aborted is None and report.survivors == len(alive)
        assert np.abs(agg - fed.expected_mean(alive)).max() < STEP
    assert not r4.key_setup  # the new session serves the next round


def test_the_abort_hint_does_not_blame_the_clients_mods_after_losses():
    from flwr_guard.guard.round_log import failure_reason
    from flwr_guard.secagg.strategy import RoundReport

    class Fake:
        history = [RoundReport(3, aborted="SecAgg+ round aborted at masked-input: 2 clients left")]

    assert "train_mods" not in failure_reason(3, [], secagg=Fake())
    Fake.history = [RoundReport(3, aborted="SecAgg+ round aborted at advertise: 0 clients left")]
    assert "train_mods" in failure_reason(3, [], secagg=Fake())


# -- GuardedStrategy: one odd reply never ends the run -------------------------------------
def test_guarded_strategy_leaves_out_an_odd_reply_under_central_dp(caplog):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from guard_attack_helpers import app, arrays, fedavg, initial
    from guard_harness import LoopbackGrid

    from flwr_guard.guard.strategy import CentralDP, GuardedStrategy

    def odd(kind):
        def train(msg, context):
            w = msg.content["arrays"]["w"].numpy() + 0.01
            metrics = {"num-examples": 10}
            record = arrays(w)
            if kind == "extra-key":
                metrics["extra"] = 1.0
            elif kind == "empty-array":
                record = ArrayRecord({"w": Array(dtype="<f4", shape=(6, 5), stype="numpy.ndarray", data=b"")})
            elif kind == "two-records":
                return Message(RecordDict({"arrays": record, "more": arrays(w),
                                           "metrics": MetricRecord(metrics)}), reply_to=msg)
            return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)
        return train

    for kind in ("extra-key", "empty-array", "two-records"):
        apps = {11: app([]), 12: app([]), 13: app([]), 14: app([], fn=odd(kind))}
        grid = LoopbackGrid(apps)
        strategy = GuardedStrategy(fedavg(4), dp=CentralDP(noise_multiplier=0.01, clipping_norm=10.0,
                                                          expected_contributors=3),
                                   reply_guard=False, audit_summary=False)
        with caplog.at_level(logging.WARNING):
            strategy.start(grid, initial(), num_rounds=2)
        assert strategy.aggregated_rounds == 2, kind
        assert "reply of node 14 left out" in caplog.text, kind
