"""Recovery from a proven wrong pair seed in multi-round SecAgg+ sessions (issue 20).

A client C in U3 reveals, at unmask, a wrong pair seed for a dropped neighbour D. Its
masked input carries its signed commitments to its pair seeds and its reveal is signed,
so the server holds proof. Without recovery the round aborts (the positive control of
the attack: only C and D knew the seed). With the ``unmask-recover`` stage the honest
neighbours of C check the proof themselves and reveal their round pair seed with C;
the server takes C's input out and releases exactly the sum of the others.

A server that tries to use the stage to frame an honest client (forged, re-signed,
unsigned, mixed-round or other-session statements, a consistent reveal, a culprit that
is not a neighbour, a survivor set below policy, a second recovery) gets a refusal
naming the reason from every honest client, and no seed.

Core tests drive the :class:`SessionClient` state machines (``Session`` harness of
``test_secagg_session.py``); ``test_mod_*`` tests drive the real ``secaggplus_mod``
with the real ``SecAggPlus`` strategy (``secagg_harness.ModFederation``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord
from secagg_harness import ModFederation, run_strategy_rounds
from test_secagg_session import Session, expected

from flwr_guard.secagg import codec, crypto
from flwr_guard.secagg.constants import SECAGG_RECORD, STATE_RECORD
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.keys import load_signing_key
from flwr_guard.secagg.messages import CulpritEvidence
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.round_ledger import RoundLedger
from flwr_guard.secagg.server import SecAggAborted
from flwr_guard.secagg.session_client import SessionClient, ratchet, round_pair_seed
from flwr_guard.secagg.transcripts import (
    SessionRound,
    commit_pair_seed,
    session_input_payload,
    session_reveal_payload,
    wrong_pair_seeds,
)

MODEL = b"m" * 32
WRONG = b"\x05" * 32


def _digest(s: Session, r: int) -> bytes:
    return SessionRound(s.server.digest, r, MODEL).digest()


def culprit_round(s: Session, r: int, gone: int, liars, nodes=None, sign: bool = True):
    """Round ``r`` without ``gone``; each of ``liars`` (colluding clients) reveals a wrong
    pair seed for ``gone`` and signs it with its own key (``sign=False``: leaves the
    honest reveal's signature). Returns (U3, plain inputs)."""
    nodes = [c for c in (s.ids if nodes is None else nodes) if c != gone]
    replies, plain = s.inputs(r, nodes)
    u3 = s.server.receive_masked_inputs(replies)
    s.server.receive_signatures({c: s.clients[c].consistency(r, u3) for c in u3})
    reveals = {}
    for c in u3:
        sigs, cts = s.server.unmask_request(c)
        reveals[c] = s.clients[c].unmask(r, u3, sigs, cts)
    for liar in liars:
        wrong = {**reveals[liar].pair_seeds, gone: WRONG}
        signature = crypto.sign(s.secrets[liar], session_reveal_payload(_digest(s, r), liar, wrong))
        reveals[liar] = dataclasses.replace(reveals[liar], pair_seeds=wrong,
                                            signature=signature if sign else reveals[liar].signature)
    s.server.receive_unmask(reveals)
    return u3, plain


def recover_all(s: Session, r: int) -> dict[int, dict[int, bytes]]:
    """Each honest neighbour answers the server's recovery request (as its mod would)."""
    requests = s.server.recovery_requests()
    replies = {j: s.clients[j].recover(r, evidence) for j, evidence in requests.items()}
    s.server.receive_recovery(replies)
    return replies


def _setting(n: int = 10, **policy):
    s = Session(n=n, **policy)
    gone = s.ids[0]
    liar = s.server.graph[gone][0]
    return s, gone, liar


# -- the attack, its positive control and the recovery ----------------------------------
def test_a_proven_wrong_pair_seed_is_recovered_and_the_round_is_exactly_the_honest_sum():
    s, gone, liar = _setting()
    u3, plain = culprit_round(s, 1, gone, [liar])
    assert set(s.server.culprits) == {liar}
    # Positive control of the attack: without the recovery stage the round aborts.
    with pytest.raises(SecAggAborted, match=f"node {liar} revealed a pair seed for node {gone}"):
        s.server.aggregate()
    replies = recover_all(s, 1)
    honest_neighbours = sorted(j for j in s.server.graph[liar] if j in u3)
    assert sorted(replies) == honest_neighbours  # only the culprit's neighbours are asked
    for j, seeds in replies.items():
        assert seeds == {liar: round_pair_seed(s.clients[j].pair_keys[liar], _digest(s, 1))}
    total, weight = s.server.aggregate()
    honest = [c for c in u3 if c != liar]
    exp_total, exp_weight = expected(plain, honest)
    np.testing.assert_array_equal(total, exp_total)  # exactly the honest survivors' sum
    assert weight == exp_weight
    assert s.server.summed == honest
    assert "revealed a pair seed for node" in s.server.stats.excluded[liar]
    # the next round runs without the culprit and is exact
    total, _, u3b, plain = s.round(2, [c for c in s.ids if c != liar])
    np.testing.assert_array_equal(total, expected(plain, u3b)[0])


def test_two_proven_culprits_are_taken_out_in_one_recovery():
    s, gone, liar = _setting()
    second = next(c for c in s.server.graph[gone] if c != liar)
    u3, plain = culprit_round(s, 1, gone, [liar, second])
    requests = s.server.recovery_requests()
    assert all(sorted(e) == sorted([liar, second]) for e in requests.values())
    recover_all(s, 1)
    total, weight = s.server.aggregate()
    honest = [c for c in u3 if c not in (liar, second)]
    np.testing.assert_array_equal(total, expected(plain, honest)[0])
    assert weight == expected(plain, honest)[1]


def test_no_recovery_request_on_an_honest_round_or_with_a_dropped_neighbour():
    s, gone, liar = _setting()
    s.round(1, [c for c in s.ids if c != gone])
    assert s.server.recovery_requests() == {}  # honest round: nothing to send
    # A neighbour of the culprit dropped before unmask: its pair seed with the culprit
    # cannot be had, so nothing is asked and the round aborts naming the culprit.
    late = next(j for j in s.server.graph[liar] if j != gone)
    others = [c for c in s.ids if c != gone]
    replies, _ = s.inputs(2, others)
    u3 = s.server.receive_masked_inputs(replies)
    s.server.receive_signatures({c: s.clients[c].consistency(2, u3) for c in u3})
    reveals = {}
    for c in u3:
        if c != late:
            sigs, cts = s.server.unmask_request(c)
            reveals[c] = s.clients[c].unmask(2, u3, sigs, cts)
    wrong = {**reveals[liar].pair_seeds, gone: WRONG}
    reveals[liar] = dataclasses.replace(reveals[liar], pair_seeds=wrong, signature=crypto.sign(
        s.secrets[liar], session_reveal_payload(_digest(s, 2), liar, wrong)))
    s.server.receive_unmask(reveals)
    assert s.server.recovery_requests() == {}
    with pytest.raises(SecAggAborted, match=f"node {liar} revealed a pair seed"):
        s.server.aggregate()


def test_an_unsigned_wrong_reveal_proves_nothing_and_the_round_aborts_as_for_a_late_dropout():
    """Without the culprit's signature on its reveal there is no proof for its
    neighbours to check: nothing is asked of them, and the round aborts as when a
    neighbour of a dropout goes silent at unmask."""
    s, gone, liar = _setting()
    culprit_round(s, 1, gone, [liar], sign=False)
    assert liar not in s.server.culprits and liar not in s.server.evidence
    assert "no proof: dropped whole" in s.server.stats.excluded[liar]
    assert s.server.recovery_requests() == {}
    with pytest.raises(SecAggAborted, match=f"node {liar} is in the sum but did not unmask"):
        s.server.aggregate()


def test_a_neighbour_that_reveals_a_wrong_seed_at_recovery_is_named_and_the_round_aborts():
    s, gone, liar = _setting()
    culprit_round(s, 1, gone, [liar])
    requests = s.server.recovery_requests()
    replies = {j: s.clients[j].recover(1, e) for j, e in requests.items()}
    bad = sorted(replies)[0]
    replies[bad] = {liar: WRONG}
    s.server.receive_recovery(replies)
    assert "at recovery that does not match its own commitment" in s.server.culprits[bad]
    with pytest.raises(SecAggAborted, match=f"the pair mask of node {bad} with it cannot be removed"):
        s.server.aggregate()


# -- framing: a malicious server forges the evidence ------------------------------------
def _genuine(s: Session, node: int) -> CulpritEvidence:
    """A client's real signed statements of the current round, as the server holds them."""
    reveal = s.server.reveals.get(node)
    return CulpritEvidence(
        s.server.commitments[node], dict(s.server.pair_commitments[node]), s.server.input_signatures[node],
        dict(reveal.pair_seeds) if reveal else {}, reveal.signature if reveal else b"")


def _refused_by_all(s: Session, r: int, victim: int, evidence: CulpritEvidence, match: str, askers=None):
    """Every honest neighbour of ``victim`` refuses with ``match`` and reveals nothing."""
    askers = [j for j in s.server.graph[victim] if j in s.server.reveals] if askers is None else askers
    assert askers
    for j in askers:
        with pytest.raises(ProtocolError, match=match):
            s.clients[j].recover(r, {victim: evidence})
        assert s.clients[j].round.get("recovered") is None


def test_framing_with_unsigned_or_re_signed_statements_is_refused():
    s, gone, liar = _setting()
    u3, _ = culprit_round(s, 1, gone, [liar])
    victim = next(v for v in s.server.graph[gone] if v != liar)  # honest, revealed its seed for gone
    real = _genuine(s, victim)
    wrong = {**real.pair_seeds, gone: WRONG}
    colluder_key = s.secrets[liar]
    cases = {
        "unsigned reveal": (dataclasses.replace(real, pair_seeds=wrong, reveal_signature=b"\0" * 64),
                            "signed reveal of culprit .* does not verify"),
        "reveal re-signed by a colluder": (dataclasses.replace(real, pair_seeds=wrong, reveal_signature=crypto.sign(
            colluder_key, session_reveal_payload(_digest(s, 1), victim, wrong))), "signed reveal of culprit"),
        "reveal signed by the server's own key": (dataclasses.replace(real, pair_seeds=wrong, reveal_signature=crypto.sign(
            crypto.ed25519_keypair()[0], session_reveal_payload(_digest(s, 1), victim, wrong))), "signed reveal of culprit"),
        "unsigned input": (dataclasses.replace(real, pair_commitments={**real.pair_commitments, gone: b"\1" * 32},
                                               input_signature=b"\0" * 64), "signed input of culprit .* does not verify"),
        "input re-signed by a colluder": (dataclasses.replace(
            real, pair_commitments={**real.pair_commitments, gone: b"\1" * 32}, input_signature=crypto.sign(
                colluder_key, session_input_payload(_digest(s, 1), victim, real.self_mask_commitment,
                                                    {**real.pair_commitments, gone: b"\1" * 32}))),
            "signed input of culprit"),
    }
    for name, (evidence, match) in cases.items():
        _refused_by_all(s, 1, victim, evidence, match), name
    # a consistent reveal (the victim's real statements) proves nothing
    _refused_by_all(s, 1, victim, real, "matches its signed commitment: no proof")
    # positive control: the real culprit's evidence is accepted by the same clients
    for j in [j for j in s.server.graph[liar] if j in u3 and j != liar]:
        assert s.clients[j].recover(1, {liar: s.server.evidence[liar]}) == {
            liar: round_pair_seed(s.clients[j].pair_keys[liar], _digest(s, 1))}


def test_framing_with_statements_of_another_round_or_session_is_refused():
    s, gone, liar = _setting()
    others = [c for c in s.ids if c != gone]
    victim = next(v for v in s.server.graph[gone] if v != liar)
    culprit_round(s, 1, gone, [])  # an honest round 1 (the victim reveals its seed for gone)
    round1 = _genuine(s, victim)
    s.round(2, others)
    culprit_round(s, 3, gone, [liar])
    round3 = _genuine(s, victim)
    assert commit_pair_seed(round3.pair_seeds[gone]) != round1.pair_commitments[gone]  # a mismatch...
    mixed = dataclasses.replace(round3, self_mask_commitment=round1.self_mask_commitment,
                                pair_commitments=round1.pair_commitments, input_signature=round1.input_signature)
    _refused_by_all(s, 3, victim, mixed, "signed input of culprit .* another round")  # ...of two rounds
    _refused_by_all(s, 3, victim, round1, "signed input of culprit")  # a whole old round
    # Inconsistent statements signed with the victim's own key, but for another session
    # (another set-up under the same keys): bound to that session's digest, they fail here.
    other = SessionRound(crypto.transcript(b"another session"), 3, MODEL).digest()
    pcs = {**round3.pair_commitments, gone: b"\1" * 32}
    forged = CulpritEvidence(
        round3.self_mask_commitment, pcs,
        crypto.sign(s.secrets[victim], session_input_payload(other, victim, round3.self_mask_commitment, pcs)),
        round3.pair_seeds, crypto.sign(s.secrets[victim], session_reveal_payload(other, victim, round3.pair_seeds)))
    _refused_by_all(s, 3, victim, forged, "signed input of culprit")
    # positive control: the real culprit of round 3 is accepted
    j = next(j for j in s.server.graph[liar] if j != gone)
    assert liar in s.clients[j].recover(3, {liar: s.server.evidence[liar]})


def test_framing_outside_the_neighbourhood_the_survivor_set_or_the_policy_is_refused():
    s, gone, liar = _setting()
    u3, _ = culprit_round(s, 1, gone, [liar])
    evidence = s.server.evidence[liar]
    outsider = next(c for c in u3 if c != liar and c not in s.server.graph[liar])
    with pytest.raises(ProtocolError, match="is a neighbour of this client"):
        s.clients[outsider].recover(1, {liar: evidence})
    j = next(j for j in s.server.graph[liar] if j in u3)
    with pytest.raises(ProtocolError, match="names this client as the culprit"):
        s.clients[j].recover(1, {j: evidence})
    with pytest.raises(ProtocolError, match="not in the survivor set this client signed"):
        s.clients[j].recover(1, {gone: evidence})
    with pytest.raises(ProtocolError, match="not a member of this session"):
        s.clients[j].recover(1, {12345: evidence})
    with pytest.raises(ProtocolError, match="has no input for"):
        s.clients[j].recover(2, {liar: evidence})
    assert s.clients[j].round.get("recovered") is None
    # positive control, then a second recovery for the round is refused
    assert liar in s.clients[j].recover(1, {liar: evidence})
    with pytest.raises(ProtocolError, match="a second recovery for round 1 refused"):
        s.clients[j].recover(1, {liar: evidence})


def test_a_survivor_set_below_policy_without_the_culprit_is_refused():
    # min cohort 9: U3 of 9 (one dropped) is signed; without the culprit 8 are left.
    s, gone, liar = _setting(min_cohort=9)
    u3, _ = culprit_round(s, 1, gone, [liar])
    assert len(u3) == 9
    for j in [j for j in s.server.graph[liar] if j in u3]:
        with pytest.raises(ProtocolError, match="survivor set without the culprits is refused: .*at least 9"):
            s.clients[j].recover(1, {liar: s.server.evidence[liar]})


def test_a_survivor_set_below_the_dp_contributors_without_the_culprit_is_refused():
    """A client whose distributed-DP noise was scaled for 9 contributors signed a U3 of 9;
    without the culprit the sum would hold 8: it refuses (as it would at consistency)."""
    s, gone, liar = _setting()
    u3, _ = culprit_round(s, 1, gone, [liar])
    j = next(j for j in s.server.graph[liar] if j in u3)
    s.clients[j].round["min_inputs"] = 9  # what masked_input(min_inputs=9) records
    with pytest.raises(ProtocolError, match="without the culprits is refused: only 8 inputs .* at least 9"):
        s.clients[j].recover(1, {liar: s.server.evidence[liar]})
    assert s.clients[j].round.get("recovered") is None


def test_a_recovery_before_the_clients_unmask_is_refused():
    s, gone, liar = _setting()
    replies, _ = s.inputs(1, [c for c in s.ids if c != gone])
    u3 = s.server.receive_masked_inputs(replies)
    j = next(j for j in s.server.graph[liar] if j in u3)
    s.clients[j].consistency(1, u3)
    with pytest.raises(ProtocolError, match="before this client unmasked it"):
        s.clients[j].recover(1, {liar: _genuine(s, liar)})


def test_evidence_wire_form_round_trips_and_rejects_malformed_fields():
    s, gone, liar = _setting()
    culprit_round(s, 1, gone, [liar])
    ev = s.server.evidence[liar]
    wire = codec.decode(codec.encode(ev.to_wire()))
    assert CulpritEvidence.from_wire(wire, 100) == ev
    for bad in ({**wire, "input_signature": b"x"}, {**wire, "pair_seeds": {"x": WRONG}},
                {**wire, "pair_commitments": {"1": b"short"}}, [], {**wire, "commitment": None}):
        with pytest.raises(ProtocolError, match="malformed evidence"):
            CulpritEvidence.from_wire(bad, 100)
    with pytest.raises(ProtocolError, match="at most 2 node ids"):
        CulpritEvidence.from_wire(wire, 2)


# -- end to end: the real strategy and the real mods ------------------------------------
N = 7
STEP = SecAggParams(5, 3).step


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR)


class Colluder(ModFederation):
    """A federation where node ``liar`` (a colluding client with its own key) reveals a
    wrong pair seed for every dropped neighbour and signs that reveal."""

    def __init__(self, n, tmp_path, seed=0):
        super().__init__(n, tmp_path, seed=seed)
        self.tmp = tmp_path
        self.liar = None
        self.replies: dict[str, dict[int, dict]] = {}  # stage -> node -> decoded payload sent

    def deliver(self, msg):
        reply = self._lie(msg, super().deliver(msg))
        if reply is not None and not reply.has_error():
            stage = str(msg.content.config_records[SECAGG_RECORD]["stage"])
            self.replies.setdefault(stage, {})[msg.metadata.dst_node_id] = codec.decode(
                reply.content.config_records[SECAGG_RECORD]["payload"])
        return reply

    def _lie(self, msg, reply):
        if (reply is None or reply.has_error() or msg.metadata.dst_node_id != self.liar
                or str(msg.content.config_records[SECAGG_RECORD]["stage"]) != "unmask"):
            return reply
        payload = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
        if not payload["pair_seeds"]:
            return reply
        payload["pair_seeds"] = dict.fromkeys(payload["pair_seeds"], WRONG)
        state = self.contexts[self.liar].state.config_records[STATE_RECORD]
        digest = codec.decode(state["session"])["round"]["digest"]
        key = load_signing_key(str(self.tmp / f"node{self.ids.index(self.liar)}.key"))
        payload["reveal_signature"] = crypto.sign(key, session_reveal_payload(
            digest, self.liar, {int(k): v for k, v in payload["pair_seeds"].items()}))
        reply.content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(payload)})
        return reply


def _stages(fed: ModFederation, r: int) -> list[str]:
    return [str(m.content.config_records[SECAGG_RECORD]["stage"]) for m in fed.per_round[r]]


def _colluder_run(tmp_path, rounds: int, **kwargs):
    fed = Colluder(N, tmp_path, seed=6)
    gone = fed.ids[4]  # an early dropout in round 2: its neighbours reveal their pair seeds
    fed.liar = next(i for i in fed.ids if i != gone)
    drop = lambda s, node, msg: None if node == gone else msg  # noqa: E731
    results = run_strategy_rounds(fed, rounds, tampers={2: drop}, multi_round=True, **kwargs)
    return fed, gone, results


def test_mod_a_culprit_round_completes_with_the_exact_honest_mean(tmp_path):
    fed, gone, results = _colluder_run(tmp_path, 3)
    (agg1, r1), (agg2, r2), (agg3, r3) = results
    liar = fed.liar
    assert r1.aborted is None and r1.survivors == N
    # round 2: the culprit is proven, taken out, and the round completes
    assert r2.aborted is None, r2.aborted
    honest = [i for i in fed.ids if i not in (gone, liar)]
    assert r2.survivors == len(honest)
    assert np.abs(agg2 - fed.expected_mean(honest)).max() < STEP
    assert f"revealed a pair seed for node {gone}" in r2.excluded[str(liar)]
    assert _stages(fed, 2).count("unmask-recover") == len([
        j for j in fed.ids if j not in (gone, liar)])  # n = 7: every other survivor is a neighbour
    # round 3: the culprit is left out of the session, no re-key, no recovery
    assert r3.aborted is None and not r3.key_setup
    assert np.abs(agg3 - fed.expected_mean([i for i in fed.ids if i != liar])).max() < STEP
    # honest rounds send no recovery message
    assert "unmask-recover" not in _stages(fed, 1) + _stages(fed, 3)


def test_mod_without_recovery_the_culprit_round_aborts(tmp_path):
    """Positive control of the attack through the real strategy and mods."""
    fed, gone, results = _colluder_run(tmp_path, 2, recover_culprits=False)
    (_, r1), (agg2, r2) = results
    assert r1.aborted is None
    assert agg2 is None and f"node {fed.liar} revealed a pair seed for node {gone}" in r2.aborted
    assert "unmask-recover" not in _stages(fed, 2)


def test_mod_honest_clients_refuse_forged_evidence_and_answer_genuine_evidence(tmp_path):
    """A deviating server sends the real mods recovery requests of its own making (the
    strategy ran without recovery, so the clients' round-1 state is unmasked and not yet
    recovered). Evidence against an honest victim (its real signed input, a wrong reveal
    re-signed by another key) is refused by every honest client with the reason; the
    culprit's real evidence makes each of them reveal exactly its committed pair seed."""
    fed = Colluder(N, tmp_path, seed=6)
    gone = fed.ids[4]
    fed.liar = next(i for i in fed.ids if i != gone)
    fed.tamper = lambda s, node, msg: None if node == gone and s == "masked-input" else msg
    ((agg, report),) = run_strategy_rounds(fed, 1, multi_round=True, recover_culprits=False)
    assert agg is None and f"node {fed.liar} revealed a pair seed" in report.aborted
    inputs, reveals = fed.replies["masked-input"], fed.replies["unmask"]

    def evidence(node: int, seeds=None, signature=None) -> CulpritEvidence:
        i, rv = inputs[node], reveals[node]
        return CulpritEvidence(
            i["commitment"], {int(k): v for k, v in i["pair_commitments"].items()}, i["input_signature"],
            seeds if seeds is not None else {int(k): v for k, v in rv["pair_seeds"].items()},
            signature if signature is not None else rv["reveal_signature"])

    victim = next(i for i in fed.ids if i not in (gone, fed.liar))
    wrong = {gone: WRONG}
    forged = evidence(victim, wrong, crypto.sign(crypto.ed25519_keypair()[0], b"any"))
    genuine = evidence(fed.liar)
    template = next(m for m in fed.per_round[1] if str(m.content.config_records[SECAGG_RECORD]["stage"]) == "unmask")

    def ask(node: int, ev: dict) -> object:
        from flwr_guard.secagg.mod import secaggplus_mod

        base = codec.decode(template.content.config_records[SECAGG_RECORD]["payload"])
        payload = {"session": base["session"], "round": 1, "evidence": ev}
        template.content[SECAGG_RECORD] = ConfigRecord(
            {"stage": "unmask-recover", "server-round": 1, "payload": codec.encode(payload)})
        template.metadata.dst_node_id = node
        return secaggplus_mod(template, fed.contexts[node], fed._train)

    honest = [j for j in fed.ids if j not in (gone, fed.liar, victim)]
    for j in honest:
        reply = ask(j, {str(victim): forged.to_wire()})
        assert reply.has_error() and "signed reveal of culprit" in reply.error.reason, j
    for j in honest:
        reply = ask(j, {str(fed.liar): genuine.to_wire()})
        assert not reply.has_error(), reply.error.reason
        seed = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])["recovered"][str(fed.liar)]
        assert commit_pair_seed(seed) == inputs[j]["pair_commitments"][str(fed.liar)]
        again = ask(j, {str(fed.liar): genuine.to_wire()})
        assert again.has_error() and "a second recovery for round 1 refused" in again.error.reason


# -- an honest client never signs a pair seed against its own commitment ---------------
def _round_two_open(s: Session, victim: int, gone: int):
    """Round 1 honest; round 2 without ``gone`` up to the signatures (U3 returned)."""
    s.round(1)
    replies, plain = s.inputs(2, [c for c in s.ids if c != gone])
    u3 = s.server.receive_masked_inputs(replies)
    s.server.receive_signatures({c: s.clients[c].consistency(2, u3) for c in u3})
    return u3, plain


def _unmask_all(s: Session, r: int, u3) -> None:
    reveals = {}
    for c in u3:
        sigs, cts = s.server.unmask_request(c)
        reveals[c] = s.clients[c].unmask(r, u3, sigs, cts)
    s.server.receive_unmask(reveals)


def test_a_failed_ledger_write_leaves_the_session_unchanged(tmp_path):
    """A refused round-3 input (the ledger write fails: disk full, or another process
    advanced it) leaves the client exactly as before: its open round 2 reveals from the
    round-2 chain link, matching its signed commitments, so the server holds no "proof"
    against it and the round is exact (review of 68fc417: the chain used to be ratcheted
    before the write, and the honest client was named a culprit and its input recovered)."""
    s = Session(n=10)
    for c in s.ids:
        s.open(c)
    victim = s.ids[3]
    gone = s.server.graph[victim][0]
    s.clients[victim].ledger = RoundLedger(tmp_path / "rounds.json", victim)
    u3, plain = _round_two_open(s, victim, gone)
    v = s.clients[victim]
    before = codec.encode(v.to_state())

    def enospc(key, rnd, opened_at):
        raise ProtocolError("the SecAgg+ round ledger cannot be written: [Errno 28] No space left on device")

    v.ledger.advance = enospc  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match=r"cannot be written: \[Errno 28\]"):
        v.masked_input(3, MODEL, *s.updates(3)[victim], rng=np.random.default_rng(1))
    assert codec.encode(v.to_state()) == before  # chain, rounds and round state untouched
    _unmask_all(s, 2, u3)
    assert victim not in s.server.culprits, s.server.culprits.get(victim)
    assert s.server.recovery_requests() == {}
    total, weight = s.server.aggregate()
    np.testing.assert_array_equal(total, expected(plain, u3)[0])  # exact, victim included
    assert victim in s.server.summed


def test_a_client_whose_chain_is_past_its_open_round_refuses_to_sign_a_contradicting_seed():
    """The safeguard, whatever the state bug: the round state keeps the round's own pair
    commitments, and unmask / unmask-recover refuse to sign a pair seed that contradicts
    them. Positive control: the seed of the advanced chain does contradict the signed
    commitment (wrong_pair_seeds names it), i.e. signing it would be a valid proof
    against an honest client."""
    s = Session(n=10)
    victim = s.ids[3]
    gone = s.server.graph[victim][0]
    u3, _ = _round_two_open(s, victim, gone)
    v = s.clients[victim]
    committed = {int(p): bytes(c) for p, c in v.round["pair_commitments"]}
    assert set(committed) == set(v.neighbour_ids)
    v.pair_keys = {p: ratchet(k, 1) for p, k in v.pair_keys.items()}  # desynchronised: round 3's link
    v.chain_round = 3
    stray = {gone: round_pair_seed(v.pair_keys[gone], v.round["digest"])}
    assert wrong_pair_seeds(committed, stray) == [gone]  # control: what would have been signed
    sigs, cts = s.server.unmask_request(victim)
    with pytest.raises(ProtocolError, match=f"unmask for round 2 refused: the pair seed with node {gone} "
                       "does not match this client's own commitment of the round"):
        v.unmask(2, u3, sigs, cts)
    assert v.round["revealed"] is False and v.round["self_mask_seed"]  # nothing revealed
    # the same at unmask-recover: a desynchronised neighbour of a proven culprit reveals nothing
    s2, gone2, liar = _setting()
    culprit_round(s2, 1, gone2, [liar])
    requests = s2.server.recovery_requests()
    j = sorted(requests)[0]
    c = s2.clients[j]
    c.pair_keys = {p: ratchet(k, 1) for p, k in c.pair_keys.items()}
    with pytest.raises(ProtocolError, match=f"unmask-recover for round 1 refused: the pair seed with node {liar} "
                       "does not match"):
        c.recover(1, requests[j])
    assert c.round.get("recovered") is None
    # the state round-trips with the commitments (the mod saves it between stages)
    back = SessionClient.from_state(codec.decode(codec.encode(v.to_state())), s.secrets[victim], s.policy)
    assert {int(p): bytes(x) for p, x in back.round["pair_commitments"]} == committed


@pytest.mark.parametrize("key", ["x", True, 1.5], ids=["str", "bool", "float"])
def test_mixed_type_pair_commitment_keys_exclude_the_input_without_raising(key):
    """Review of 68fc417: a str key among the int ones made ``sorted`` raise TypeError in
    SessionServer.receive_masked_inputs (one bad client sank the round). Now that input
    is excluded as malformed and the round completes exactly without it."""
    s = Session(n=8)
    replies, plain = s.inputs(1, s.ids)
    bad = s.ids[0]
    commitments = {**replies[bad].pair_commitments, key: b"\0" * 32}
    replies[bad] = dataclasses.replace(replies[bad], pair_commitments=commitments)
    (total, weight), u3 = s.finish(replies)
    assert bad not in u3
    assert s.server.stats.excluded[bad] == "malformed pair-seed commitments"
    np.testing.assert_array_equal(total, expected(plain, u3)[0])
