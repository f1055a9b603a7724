"""Multi-round SecAgg+ sessions (flwr_guard.secagg.session_client and session_server):
exact sums over many rounds with dropouts and returns, and the attacks a malicious server can try on keys
that live longer than one round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_harness import federation_policy

from flwr_guard.secagg import codec, crypto, prg
from flwr_guard.secagg.client import SecAggClient, encode_input
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.messages import (
    RoundInput,
    RoundReveal,
    pack_open,
    pack_roster,
    unpack_advertisements,
    unpack_nonces,
    unpack_roster,
)
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.policy import PolicyViolation
from flwr_guard.secagg.server import SecAggAborted, SecAggServer
from flwr_guard.secagg.session_client import SessionClient, round_pair_seed
from flwr_guard.secagg.session_server import SessionServer
from flwr_guard.secagg.transcripts import SessionRound

D = 40


class Session:
    """n clients and a server through the set-up and any number of rounds, in-process,
    with every payload passing through its wire encoding."""

    def __init__(self, n: int = 10, seed: int = 0, k: int | None = None, t: int | None = None, **policy):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.ids = sorted({int(i) for i in rng.integers(1, 2**63 - 1, size=n)})
        params = SecAggParams.for_cohort(n, k, t)
        self.context = RoundContext(7, 1, tuple(self.ids), params, D + 1, b"h" * 32, multi_round=True)
        secrets = {i: crypto.ed25519_keypair()[0] for i in self.ids}
        self.policy = federation_policy(secrets.values(), **policy)
        self.setups = {i: SecAggClient(i, secrets[i], self.policy) for i in self.ids}
        self.secrets = secrets
        self.clients: dict[int, SessionClient] = {}
        setup = SecAggServer(self.context)
        u1 = setup.receive_advertisements({c: self.setups[c].advertise(self.context) for c in self.ids})
        blob = codec.decode(codec.encode({"roster": pack_roster(u1)}))["roster"]
        setup.receive_nonces({c: self.setups[c].receive_roster(unpack_roster(blob)) for c in self.ids})
        self.server = SessionServer(setup)

    def open(self, node: int) -> SessionClient:
        wire = codec.decode(codec.encode(pack_open(self.server.open_payload(node))))
        client = SessionClient.open(
            self.setups[node], unpack_advertisements(wire["advertisements"]), unpack_nonces(wire["nonces"])
        )
        # persistence between stages, as in the mod
        client = SessionClient.from_state(
            codec.decode(codec.encode(client.to_state())), self.secrets[node], self.policy
        )
        self.clients[node] = client
        return client

    def updates(self, r: int) -> dict[int, tuple[np.ndarray, int]]:
        rng = np.random.default_rng(1000 + r)
        return {c: (rng.normal(0, 0.3, D), int(rng.integers(1, 100))) for c in self.ids}

    def inputs(self, r: int, nodes, model: bytes = b"m" * 32, models: dict[int, bytes] | None = None):
        """Each of ``nodes`` (opening its session if needed) masks round ``r``'s update;
        returns (replies, expected plain vectors)."""
        self.server.start_round(r, model, list(nodes))
        replies, plain = {}, {}
        for c in nodes:
            client = self.clients.get(c) or self.open(c)
            update, weight = self.updates(r)[c]
            replies[c] = client.masked_input(
                r, (models or {}).get(c, model), update, weight, rng=np.random.default_rng(c + r)
            )
            plain[c], _ = encode_input(self.context, update, weight, rng=np.random.default_rng(c + r))
        return replies, plain

    def finish(self, replies, drop_before_sign=(), drop_before_unmask=()):
        u3 = self.server.receive_masked_inputs(replies)
        signatures = {c: self.clients[c].consistency(self.server.server_round, u3)
                      for c in u3 if c not in drop_before_sign}
        signers = self.server.receive_signatures(signatures)
        reveals = {}
        for c in signers:
            if c in drop_before_unmask:
                continue
            sigs, cts = self.server.unmask_request(c)
            reveals[c] = self.clients[c].unmask(self.server.server_round, u3, sigs, cts)
        self.server.receive_unmask(reveals)
        return self.server.aggregate(), u3

    def round(self, r: int, nodes=None, **drops):
        nodes = self.ids if nodes is None else nodes
        replies, plain = self.inputs(r, nodes)
        (total, weight), u3 = self.finish(replies, **drops)
        return total, weight, u3, plain


def expected(plain: dict[int, np.ndarray], members, bits: int = 32) -> tuple[np.ndarray, int]:
    dtype = prg.mask_dtype(bits)
    s = np.zeros(D + 1, dtype=dtype)
    for c in members:
        s += plain[c]
    return s[:-1].astype(np.int64), int(s[-1])


def test_exact_sums_over_rounds_with_a_dropout_and_its_return():
    s = Session(n=10)
    for r in (1, 2, 3):
        nodes = s.ids if r != 2 else s.ids[1:]  # node 0 misses round 2, is back in round 3
        total, weight, u3, plain = s.round(r, nodes)
        assert u3 == sorted(nodes)
        exp_total, exp_weight = expected(plain, u3)
        np.testing.assert_array_equal(total, exp_total)
        assert weight == exp_weight
    assert s.server.rounds == 3


def test_late_dropout_is_recovered_from_shares_when_no_neighbour_is_out():
    s = Session(n=10)
    late = s.ids[3]
    total, weight, u3, plain = s.round(1, drop_before_unmask={late})
    assert late in u3 and late not in s.server.stats.unmasked
    np.testing.assert_array_equal(total, expected(plain, u3)[0])


def test_late_dropout_next_to_an_early_one_aborts_the_round_and_the_next_runs():
    s = Session(n=10)
    early = s.ids[0]
    late = s.server.graph[early][0]  # a neighbour of the early dropout
    others = [c for c in s.ids if c != early]
    with pytest.raises(SecAggAborted, match="known only to the two of them"):
        s.round(1, others, drop_before_unmask={late})
    total, _, u3, plain = s.round(2)
    np.testing.assert_array_equal(total, expected(plain, u3)[0])


def test_an_input_for_the_same_or_an_earlier_round_is_refused():
    s = Session(n=6)
    s.round(5)
    client = s.clients[s.ids[0]]
    for r in (5, 4):
        with pytest.raises(ProtocolError, match="replayed or rewound"):
            client.masked_input(r, b"m" * 32, np.zeros(D), 1)


def test_dropped_client_stays_hidden_across_rounds():
    """The attack that keys reused across rounds invite: u's self mask is revealed in
    round 1 (u active); in round 2 the server leaves u out to collect its neighbours'
    pair seeds with u, then strips them from u's round-1 input. The seeds revealed in
    round 2 are of round 2 only: the attack recovers nothing. The positive control: with
    round 1's seeds (which no honest client reveals, u being in that sum) it would."""
    s = Session(n=10)
    u = s.ids[0]
    replies1, plain1 = s.inputs(1, s.ids)
    s.finish(replies1)
    b1 = s.server.reveals[u].self_mask_seed
    # the round-1 pair seeds with u (no honest client reveals them: u was in the sum)
    d1 = SessionRound(s.server.digest, 1, b"m" * 32).digest()
    seeds1 = {v: round_pair_seed(s.clients[v].pair_keys[u], d1) for v in s.server.graph[u]}
    s.round(2, [c for c in s.ids if c != u])
    seeds2 = {v: s.server.reveals[v].pair_seeds[u] for v in s.server.graph[u]}
    y = replies1[u].vector - prg.expand(b1, D + 1, 32)

    def strip(seeds):
        z = y.copy()
        for v, seed in seeds.items():
            mask = prg.expand(seed, D + 1, 32)
            z = z - mask if u < v else z + mask
        return z

    assert not np.array_equal(strip(seeds2), plain1[u])
    np.testing.assert_array_equal(strip(seeds1), plain1[u])


def test_split_view_of_the_survivor_set_is_refused():
    """The server tells u's neighbours that u dropped (to collect the pair seeds that,
    with u's own seed, would unmask its input) and tells u it is in the sum: the
    neighbours signed a set without u, so u does not see t signatures on its set and
    reveals nothing."""
    s = Session(n=10)
    u = s.ids[0]
    replies, _ = s.inputs(1, s.ids)
    s.server.receive_masked_inputs(replies)
    full = s.ids
    without_u = [c for c in s.ids if c != u]
    sig_u = s.clients[u].consistency(1, full)
    sigs = {c: s.clients[c].consistency(1, without_u) for c in without_u}
    with pytest.raises(ProtocolError, match="invalid"):
        s.clients[u].unmask(1, full, {u: sig_u, **{v: sigs[v] for v in s.server.graph[u]}}, {})
    # and a neighbour cannot be made to sign the other set too
    v = s.server.graph[u][0]
    with pytest.raises(ProtocolError, match="second, different survivor set"):
        s.clients[v].consistency(1, full)
    # without neighbours' signatures u reveals nothing either
    with pytest.raises(ProtocolError, match="valid consistency signatures"):
        s.clients[u].unmask(1, full, {u: sig_u}, {})


def test_model_inconsistency_breaks_the_signatures_of_the_odd_client():
    s = Session(n=8)
    odd = s.ids[2]
    replies, _ = s.inputs(1, s.ids, models={odd: b"x" * 32})
    s.server.receive_masked_inputs(replies)
    # An honest server already leaves it out: its signed input is over another digest.
    assert odd not in s.server.stats.masked
    assert "input's commitments does not verify" in s.server.stats.excluded[odd]
    u3 = sorted(s.ids)  # a deviating server keeps it in the sum all the same
    sigs = {c: s.clients[c].consistency(1, u3) for c in u3}
    v = s.server.graph[odd][0]
    with pytest.raises(ProtocolError, match="invalid"):
        s.clients[v].unmask(1, u3, {odd: sigs[odd], v: sigs[v]}, {})


def test_policy_floor_on_the_inputs_in_the_sum():
    s = Session(n=6, min_cohort=6)
    replies, _ = s.inputs(1, s.ids[:5])
    u3 = s.server.receive_masked_inputs(replies)
    with pytest.raises(PolicyViolation, match="at least 6"):
        s.clients[u3[0]].consistency(1, u3)


def test_a_per_round_setup_cannot_open_a_session():
    s = Session(n=5)
    node = s.ids[0]
    setup = s.setups[node]
    setup.context = dataclasses.replace(setup.context, multi_round=False)
    with pytest.raises(ProtocolError, match="per-round"):
        s.open(node)


def test_a_multi_round_setup_never_shares_its_keys():
    s = Session(n=5)
    node = s.ids[0]
    with pytest.raises(ProtocolError, match="never Shamir-shared"):
        s.setups[node].share_keys([], s.server.nonces)


def test_the_session_digest_is_not_the_per_round_one():
    s = Session(n=5)
    per_round = dataclasses.replace(s.context, multi_round=False)
    assert per_round.digest() != s.context.digest()
    assert RoundContext.from_dict(s.context.to_dict()) == s.context
    with pytest.raises(ValueError, match="multi_round"):
        RoundContext.from_dict({**s.context.to_dict(), "multi_round": "yes"})


def test_malformed_inputs_and_reveals_exclude_their_sender_only():
    s = Session(n=10)
    replies, plain = s.inputs(1, s.ids)
    bad_input = s.ids[1]
    replies[bad_input] = RoundInput(replies[bad_input].vector[:-1], b"c" * 32, {}, 0)
    u3 = s.server.receive_masked_inputs(replies)
    assert bad_input not in u3 and "malformed" in s.server.stats.excluded[bad_input]
    # (a revealer next to the dropped node would sink the round: its pair seed is needed)
    bad_reveal = next(c for c in u3 if bad_input not in s.server.graph[c])
    signers = s.server.receive_signatures({c: s.clients[c].consistency(1, u3) for c in u3})
    reveals = {}
    for c in signers:
        sigs, cts = s.server.unmask_request(c)
        reveals[c] = s.clients[c].unmask(1, u3, sigs, cts)
    # a reveal that also hands in a pair seed of an active neighbour is dropped whole
    extra = next(v for v in s.server.graph[bad_reveal] if v in u3)
    rv = reveals[bad_reveal]
    reveals[bad_reveal] = RoundReveal(rv.self_mask_seed, rv.shares, {**rv.pair_seeds, extra: b"p" * 32}, [])
    s.server.receive_unmask(reveals)
    assert bad_reveal not in s.server.stats.unmasked
    total, weight = s.server.aggregate()  # its seed is reconstructed from shares
    np.testing.assert_array_equal(total, expected(plain, u3)[0])


def test_a_wrong_self_mask_seed_falls_back_to_the_shares():
    s = Session(n=10)
    replies, plain = s.inputs(1, s.ids)
    u3 = s.server.receive_masked_inputs(replies)
    s.server.receive_signatures({c: s.clients[c].consistency(1, u3) for c in u3})
    reveals = {}
    for c in u3:
        sigs, cts = s.server.unmask_request(c)
        reveals[c] = s.clients[c].unmask(1, u3, sigs, cts)
    liar = u3[4]
    reveals[liar] = dataclasses.replace(reveals[liar], self_mask_seed=b"\0" * 32)
    s.server.receive_unmask(reveals)
    total, _ = s.server.aggregate()
    np.testing.assert_array_equal(total, expected(plain, u3)[0])
    assert "does not match its commitment" in s.server.stats.excluded[liar]


def test_a_second_reveal_of_a_round_is_refused():
    s = Session(n=6)
    replies, _ = s.inputs(1, s.ids)
    u3 = s.server.receive_masked_inputs(replies)
    s.server.receive_signatures({c: s.clients[c].consistency(1, u3) for c in u3})
    c = u3[0]
    sigs, cts = s.server.unmask_request(c)
    s.clients[c].unmask(1, u3, sigs, cts)
    with pytest.raises(ProtocolError, match="already unmasked"):
        s.clients[c].unmask(1, u3, sigs, cts)


# -- through the real mod and strategy (in-process Grid of secagg_harness) -------------
def _round_payload(msg) -> dict:
    from flwr_guard.secagg.constants import SECAGG_RECORD

    return codec.decode(msg.content.config_records[SECAGG_RECORD]["payload"])


def _stage(msg) -> str:
    from flwr_guard.secagg.constants import SECAGG_RECORD

    return str(msg.content.config_records[SECAGG_RECORD]["stage"])


def test_strategy_sets_keys_up_once_and_then_sends_three_messages_per_round(tmp_path):
    from secagg_harness import ModFederation, run_strategy_rounds

    fed = ModFederation(6, tmp_path)
    results = run_strategy_rounds(fed, 3)
    n = len(fed.ids)
    for r, (agg, report) in enumerate(results, start=1):
        assert report.aborted is None and report.survivors == n and report.multi_round
        assert report.key_setup == (r == 1)
        assert np.abs(agg - fed.expected_mean(fed.ids)).max() < SecAggParams(5, 3).step
    assert len(fed.per_round[1]) == 5 * n  # advertise, roster, input, consistency, unmask
    assert len(fed.per_round[2]) == len(fed.per_round[3]) == 3 * n
    # only the first input of a node carries the nonces and its neighbours' keys
    inputs1 = [m for m in fed.per_round[1] if _stage(m) == "masked-input"]
    assert len(inputs1) == n and all("open" in _round_payload(m) for m in inputs1)
    assert not any("open" in _round_payload(m) for m in fed.per_round[2])
    # U3 travels as who is absent from it: nobody here
    assert all(_round_payload(m)["absent"] == [] for m in fed.per_round[2]
               if _stage(m) in ("consistency", "unmask"))


def test_strategy_dropout_and_return_without_a_re_key(tmp_path):
    from secagg_harness import ModFederation, run_strategy_rounds

    fed = ModFederation(7, tmp_path, seed=2)
    gone = fed.ids[3]
    drop = {2: lambda s, node, msg: None if node == gone else msg}
    results = run_strategy_rounds(fed, 3, tampers=drop)
    (_, r1), (agg2, r2), (agg3, r3) = results
    others = [i for i in fed.ids if i != gone]
    assert r2.survivors == len(others) and not r2.key_setup
    assert np.abs(agg2 - fed.expected_mean(others)).max() < SecAggParams(5, 3).step
    assert r3.survivors == len(fed.ids) and not r3.key_setup  # back, same keys
    assert np.abs(agg3 - fed.expected_mean(fed.ids)).max() < SecAggParams(5, 3).step


def test_strategy_per_round_mode_sets_keys_up_every_round(tmp_path):
    from secagg_harness import ModFederation, run_strategy_rounds

    fed = ModFederation(5, tmp_path)
    results = run_strategy_rounds(fed, 2, multi_round=False)
    assert all(rep.key_setup and not rep.multi_round and rep.survivors == 5 for _, rep in results)
    assert len(fed.per_round[2]) == 6 * 5


def test_a_node_that_lost_its_session_is_left_out_without_re_keying_the_cohort(tmp_path):
    """Its error reply ("no usable SecAgg+ session") leaves that one node out of the
    session's next rounds (it rejoins at the next set-up); the others go on under
    their keys."""
    from flwr.app import RecordDict
    from secagg_harness import ModFederation, run_strategy_rounds

    fed = ModFederation(6, tmp_path)
    victim = fed.ids[0]

    def wipe(stage, node, msg):
        if node == victim and stage == "masked-input":
            fed.contexts[victim].state = RecordDict()  # its storage is gone
        return msg

    results = run_strategy_rounds(fed, 3, tampers={2: wipe})
    (_, r1), (agg2, r2), (agg3, r3) = results
    assert r2.survivors == 5 and not r2.key_setup
    assert np.abs(agg2 - fed.expected_mean(fed.ids[1:])).max() < SecAggParams(5, 3).step
    assert not r3.key_setup and r3.survivors == 5
    assert victim not in {m.metadata.dst_node_id for m in fed.per_round[3]}
    assert np.abs(agg3 - fed.expected_mean(fed.ids[1:])).max() < SecAggParams(5, 3).step


def test_a_replayed_round_number_is_refused_by_every_client(tmp_path):
    from secagg_harness import ModFederation, run_strategy_rounds

    from flwr_guard.secagg.constants import SECAGG_RECORD

    fed = ModFederation(5, tmp_path)

    def rewind(stage, node, msg):
        record = msg.content.config_records[SECAGG_RECORD]
        payload = codec.decode(record["payload"])
        if "session" in payload:
            payload["round"] = 1  # the inputs of round 1 again, under round 1's masks
            record["payload"] = codec.encode(payload)
        return msg

    results = run_strategy_rounds(fed, 2, tampers={2: rewind})
    agg2, r2 = results[1]
    assert agg2 is None and "aborted at masked-input" in r2.aborted


@pytest.mark.parametrize("stage", ["masked-input", "consistency", "unmask"])
def test_strategy_one_dropout_at_each_stage_of_a_session_round(tmp_path, stage):
    from secagg_harness import ModFederation, run_strategy_rounds

    order = ["masked-input", "consistency", "unmask"]
    fed = ModFederation(7, tmp_path, seed=1)
    gone = fed.ids[2]

    def drop(s, node, msg):
        return None if node == gone and s in order[order.index(stage):] else msg

    (_, r1), (agg, r2) = run_strategy_rounds(fed, 2, tampers={2: drop})
    in_sum = fed.ids if stage != "masked-input" else [i for i in fed.ids if i != gone]
    assert r2.aborted is None and not r2.key_setup and r2.survivors == len(in_sum)
    assert r2.dropouts[stage] == 1
    assert np.abs(agg - fed.expected_mean(in_sum)).max() < SecAggParams(5, 3).step


def test_survivor_sets_must_be_connected_in_the_graph():
    from flwr_guard.secagg.session_client import is_connected

    ring = {i: [(i - 1) % 8, (i + 1) % 8] for i in range(8)}
    assert is_connected(ring, range(8)) and is_connected(ring, [0, 1, 2])
    assert not is_connected(ring, [0, 1, 4, 5]) and not is_connected(ring, [])
    # In the session's graph (Harary, t > k/2) every member of a U3 that passes the t
    # check has a connected U3: the explicit check is defence in depth.
    s = Session(n=10)
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(300):
        u3 = sorted(int(i) for i in rng.choice(s.ids, size=int(rng.integers(4, 10)), replace=False))
        if all(sum(v in u3 for v in s.server.graph[u]) >= s.server._threshold for u in u3):
            assert is_connected(s.server.graph, u3)
            checked += 1
    assert checked > 20
