"""Multi-round SecAgg+ sessions against a malicious server (with colluding clients where
the attack needs them), a careless operator and hostile messages.

Each test implements one attack on the sessions (:mod:`flwr_guard.secagg.session_client`,
:mod:`flwr_guard.secagg.session_server`, and their mod and strategy adapters) and asserts it is refused or recovers nothing; where meaningful a
positive control shows the same computation succeeds once the protection's assumption
is broken. Attacks that succeed today are marked ``xfail(strict=True)`` with the reason
(the fixes are the coordinator's; this file does not change ``src/``).

Core-level tests drive honest :class:`SessionClient` state machines through the
``Session`` harness of ``test_secagg_session.py`` (every payload through its wire
encoding); mod-level tests (``test_mod_*``) drive the real ``secaggplus_mod`` with the
real ``SecAggPlus`` strategy through the in-process Grid of ``secagg_harness``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from secagg_harness import ModFederation, federation_policy, run_strategy_rounds
from test_secagg_session import D, Session, expected

from flwr_guard.secagg import codec, crypto, prg
from flwr_guard.secagg.client import SecAggClient, encode_input
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.messages import pack_open, pack_roster, unpack_advertisements, unpack_nonces, unpack_roster
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.round_ledger import RoundLedger
from flwr_guard.secagg.server import SecAggServer
from flwr_guard.secagg.session_client import SessionClient, round_pair_seed
from flwr_guard.secagg.session_server import SessionServer
from flwr_guard.secagg.transcripts import (
    SessionRound,
    commit_self_mask,
    pairwise_sign,
    session_consistency_payload,
    session_reveal_payload,
)

MODEL = b"m" * 32


class AttackSession(Session):
    """:class:`Session` whose set-up lets a deviating party rewrite advertisements:
    ``ad_hook(node, advertisement, context, signing_secret)`` returns the one sent."""

    def __init__(self, n: int = 10, seed: int = 0, ad_hook=None, **policy):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.ids = sorted({int(i) for i in rng.integers(1, 2**63 - 1, size=n)})
        params = SecAggParams.for_cohort(n)
        self.context = RoundContext(7, 1, tuple(self.ids), params, D + 1, b"h" * 32, multi_round=True)
        self.secrets = {i: crypto.ed25519_keypair()[0] for i in self.ids}
        self.policy = federation_policy(self.secrets.values(), **policy)
        self.setups = {i: SecAggClient(i, self.secrets[i], self.policy) for i in self.ids}
        self.clients: dict[int, SessionClient] = {}
        setup = SecAggServer(self.context)
        ads = {}
        for c in self.ids:
            ad = self.setups[c].advertise(self.context)
            if ad_hook is not None:
                ad = ad_hook(c, ad, self.context, self.secrets[c])
                self.setups[c].advertisements[c] = ad  # the deviating client's own view
            ads[c] = ad
        u1 = setup.receive_advertisements(ads)
        blob = codec.decode(codec.encode({"roster": pack_roster(u1)}))["roster"]
        setup.receive_nonces({c: self.setups[c].receive_roster(unpack_roster(blob))
                              for c in (e.node_id for e in u1)})
        self.server = SessionServer(setup)


def _round_digest(s: Session, r: int, model: bytes = MODEL) -> bytes:
    return SessionRound(s.server.digest, r, model).digest()


def _bits(s: Session) -> int:
    return s.context.params.modulus_bits


def _strip_pair_masks(s: Session, u: int, y: np.ndarray, seeds: dict[int, bytes]) -> np.ndarray:
    """``y`` minus the pair masks ``u`` added with the given seeds (as a server would)."""
    z = y.copy()
    for v, seed in seeds.items():
        mask = prg.expand(seed, D + 1, _bits(s))
        if pairwise_sign(u, v) > 0:
            z -= mask
        else:
            z += mask
    return z


def _forged_signature(s: Session, signer: int, r: int, u3) -> bytes:
    """A colluding client signs whatever survivor set the server asks for."""
    payload = session_consistency_payload(_round_digest(s, r), s.server.roster_hash, s.server.seed, sorted(u3))
    return crypto.sign(s.secrets[signer], payload)


# -- 1. reveals outside the client's own round -----------------------------------------
def test_no_signature_or_reveal_for_a_round_the_client_did_not_input():
    """A server that asks for round r's signature or secrets of a client that sent no
    input in round r (a future round, or a past one it moved on from) gets a refusal:
    each client holds exactly one round state, the one of its last input."""
    s = Session(n=6)
    s.round(1)
    c = s.ids[0]
    client = s.clients[c]
    for r in (2, 0):
        with pytest.raises(ProtocolError, match="has no input for"):
            client.consistency(r, s.ids)
        with pytest.raises(ProtocolError, match="has no input for"):
            client.unmask(r, s.ids, {}, {})
    replies, _ = s.inputs(3, s.ids)  # round 3 input: round 1's state is gone
    with pytest.raises(ProtocolError, match="has no input for"):
        client.unmask(1, s.ids, {}, {})
    # the one round it has: one signed set, one reveal
    client.consistency(3, s.ids)
    with pytest.raises(ProtocolError, match="second, different survivor set"):
        client.consistency(3, [i for i in s.ids if i != s.ids[1]])


# -- 1b. mixing what different rounds reveal ---------------------------------------
def test_round_1_signatures_do_not_make_a_client_reveal_in_round_2():
    """Replay across rounds: in round 2 the server tells u's neighbours that u dropped
    (they sign that set and reveal their round-2 pair seeds with u) and shows u its
    neighbours' round-1 signatures on the full set. u refuses: a signature binds the
    round digest. Positive control: had u revealed, its round-2 input would be exact."""
    s = Session(n=10)
    u = s.ids[0]
    s.round(1)
    old = dict(s.server.signatures)  # every client signed U3 = all in round 1
    replies, plain = s.inputs(2, s.ids)
    without_u = [c for c in s.ids if c != u]
    sigs = {c: s.clients[c].consistency(2, without_u) for c in without_u}
    seeds = {}
    for v in s.server.graph[u]:
        mine = {w: sigs[w] for w in [v, *s.server.graph[v]] if w in sigs}
        seeds[v] = s.clients[v].unmask(2, without_u, mine, {}).pair_seeds[u]
    s.clients[u].consistency(2, s.ids)
    replayed = {w: old[w] for w in [u, *s.server.graph[u]] if w != u}
    with pytest.raises(ProtocolError, match="is invalid"):
        s.clients[u].unmask(2, s.ids, replayed, {})
    # what the refusal protects: u's round-2 self-mask seed is all that is missing
    b2 = s.clients[u].round["self_mask_seed"]
    y = replies[u].vector - prg.expand(b2, D + 1, _bits(s))
    np.testing.assert_array_equal(_strip_pair_masks(s, u, y, seeds), plain[u])


def test_round_1_share_ciphertexts_do_not_open_in_round_2():
    """Round 1: u's neighbours are told u dropped and reveal the round-1 pair seeds
    with u; u reveals nothing. Round 2: the server routes u's round-1 share ciphertexts
    to the same neighbours, now told u is in the sum, to get t shares of u's round-1
    self-mask seed. The shares are encrypted with the round digest as associated data:
    none opens, u is reported as a bad sender, no share leaves. Positive control: under
    round 1's associated data they open and would give the seed, hence u's input."""
    from flwr_guard.secagg.session_client import round_share_aad

    s = Session(n=10)
    u = s.ids[0]
    replies1, plain1 = s.inputs(1, s.ids)
    without_u = [c for c in s.ids if c != u]
    sigs1 = {c: s.clients[c].consistency(1, without_u) for c in without_u}
    seeds1 = {}
    for v in s.server.graph[u]:
        mine = {w: sigs1[w] for w in [v, *s.server.graph[v]] if w in sigs1}
        seeds1[v] = s.clients[v].unmask(1, without_u, mine, {}).pair_seeds[u]
    replies2, _ = s.inputs(2, s.ids)
    u3 = s.server.receive_masked_inputs(replies2)
    s.server.receive_signatures({c: s.clients[c].consistency(2, u3) for c in u3})
    held = []
    for v in s.server.graph[u]:
        signatures, cts = s.server.unmask_request(v)
        cts[u] = replies1[u].ciphertexts[v]  # round 1's, rerouted
        reveal = s.clients[v].unmask(2, u3, signatures, cts)
        assert u not in reveal.shares and u in reveal.bad_senders
        key = s.clients[v].share_keys[u]
        plaintext = crypto.decrypt(key, replies1[u].ciphertexts[v], round_share_aad(_round_digest(s, 1), u, v))
        held.append((int.from_bytes(plaintext[:2], "big"), plaintext[2:]))
    b1 = crypto.combine_shares(held, s.context.params.reconstruction_threshold)
    y = replies1[u].vector - prg.expand(b1, D + 1, _bits(s))
    np.testing.assert_array_equal(_strip_pair_masks(s, u, y, seeds1), plain1[u])


def test_an_input_sent_into_a_round_whose_pair_seeds_were_revealed_stays_hidden():
    """Re-numbering: round 6 runs without u (its neighbours reveal their round-6 pair
    seeds with u); then the server sends u round 6 (u's last round was 5, so it
    accepts, same model): every pair mask of u's input is known to the server. Its self
    mask is not: u finds no neighbour signature on a set with u, the neighbours refuse
    a second set or a second reveal for round 6. Positive control: the self-mask seed
    is all that is missing."""
    s = Session(n=10)
    u = s.ids[0]
    s.round(5)
    others = [c for c in s.ids if c != u]
    s.round(6, others)
    seeds = {v: s.server.reveals[v].pair_seeds[u] for v in s.server.graph[u]}
    update, weight = s.updates(6)[u]
    late = s.clients[u].masked_input(6, MODEL, update, weight, rng=np.random.default_rng(6))
    x, _ = encode_input(s.context, update, weight, rng=np.random.default_rng(6))
    s.clients[u].consistency(6, s.ids)
    old = {v: s.server.signatures[v] for v in s.server.graph[u]}  # signatures on U3 without u
    with pytest.raises(ProtocolError, match="is invalid"):
        s.clients[u].unmask(6, s.ids, old, {})
    v = s.server.graph[u][0]
    with pytest.raises(ProtocolError, match="second, different survivor set"):
        s.clients[v].consistency(6, s.ids)
    with pytest.raises(ProtocolError):
        s.clients[v].unmask(6, s.ids, {}, {v: late.ciphertexts[v]})
    with pytest.raises(ProtocolError, match="already unmasked"):
        s.clients[v].unmask(6, others, {}, {u: late.ciphertexts[v]})
    b = s.clients[u].round["self_mask_seed"]
    y = late.vector - prg.expand(b, D + 1, _bits(s))
    np.testing.assert_array_equal(_strip_pair_masks(s, u, y, seeds), x)


def test_signatures_of_non_neighbours_do_not_count():
    """t colluding clients that are not u's neighbours sign a set with u: u needs t of
    its own neighbours' signatures (Bell et al.: the threshold is per neighbourhood)."""
    s = Session(n=20, k=6)  # t = 4; u has 13 non-neighbours
    u = s.ids[0]
    t = s.context.params.reconstruction_threshold
    replies, _ = s.inputs(1, s.ids)
    sigs = {u: s.clients[u].consistency(1, s.ids)}
    others = [c for c in s.ids if c not in s.server.graph[u] and c != u]
    sigs.update({c: _forged_signature(s, c, 1, s.ids) for c in others[: 2 * t]})
    with pytest.raises(ProtocolError, match="0 valid consistency signatures from neighbours"):
        s.clients[u].unmask(1, s.ids, sigs, {})
    sigs.update({v: _forged_signature(s, v, 1, s.ids) for v in s.server.graph[u][: t - 1]})
    with pytest.raises(ProtocolError, match=f"{t - 1} valid consistency signatures"):
        s.clients[u].unmask(1, s.ids, sigs, {})
    # positive control: t of its neighbours' signatures suffice
    sigs.update({v: _forged_signature(s, v, 1, s.ids) for v in s.server.graph[u][:t]})
    reveal = s.clients[u].unmask(1, s.ids, sigs, {})
    assert commit_self_mask(reveal.self_mask_seed) == replies[u].self_mask_commitment


def test_an_input_the_server_leaves_out_of_the_sum_stays_hidden_by_its_self_mask():
    """The server receives v's round input but tells everyone v dropped: v's neighbours
    reveal all their round pair seeds with v, yet v's self-mask seed is never revealed
    (v is not asked to sign, and no neighbour reveals a share of the seed of a node out
    of the sum it signed). Positive control: the seed is the only thing missing."""
    s = Session(n=10)
    v = s.ids[2]
    replies, plain = s.inputs(1, s.ids)
    u3 = s.server.receive_masked_inputs({c: r for c, r in replies.items() if c != v})
    assert v not in u3
    s.server.receive_signatures({c: s.clients[c].consistency(1, u3) for c in u3})
    reveals = {}
    for c in u3:
        signatures, cts = s.server.unmask_request(c)
        if v in s.server.graph[c]:
            cts[v] = replies[v].ciphertexts[c]  # the server routes v's shares all the same
        reveals[c] = s.clients[c].unmask(1, u3, signatures, cts)
    assert not any(v in rv.shares for rv in reveals.values())
    seeds = {w: reveals[w].pair_seeds[v] for w in s.server.graph[v]}
    with pytest.raises(ProtocolError, match="omits this client"):
        s.clients[v].consistency(1, u3)
    b = s.clients[v].round["self_mask_seed"]  # what only v holds
    y = replies[v].vector - prg.expand(b, D + 1, _bits(s))
    np.testing.assert_array_equal(_strip_pair_masks(s, v, y, seeds), plain[v])


def test_a_wrong_pair_seed_from_one_revealer_aborts_the_round_and_names_it():
    """A revealer next to an early dropout hands in a well-formed but wrong pair seed:
    only the two ends ever knew the seed, but the revealer's own input committed to it
    (``commit_pair_seed``), so the server names the revealer; the mask cannot be
    removed, so the round aborts (no wrong aggregate is released). The honest round
    before and after gives exact sums."""
    from flwr_guard.secagg.server import SecAggAborted

    s = Session(n=10)
    gone = s.ids[0]
    liar = s.server.graph[gone][0]
    others = [c for c in s.ids if c != gone]
    total, _, u3, plain = s.round(1, others)
    np.testing.assert_array_equal(total, expected(plain, u3)[0])
    replies, _ = s.inputs(2, others)
    u3 = s.server.receive_masked_inputs(replies)
    s.server.receive_signatures({c: s.clients[c].consistency(2, u3) for c in u3})
    reveals = {}
    for c in u3:
        signatures, cts = s.server.unmask_request(c)
        reveals[c] = s.clients[c].unmask(2, u3, signatures, cts)
    wrong = {gone: crypto.random_secret()}  # signed by the liar itself (a colluding client)
    reveals[liar] = dataclasses.replace(reveals[liar], pair_seeds=wrong, signature=crypto.sign(
        s.secrets[liar], session_reveal_payload(_round_digest(s, 2), liar, wrong)))
    s.server.receive_unmask(reveals)
    # Without the recovery stage (tests/test_secagg_recover.py) the round aborts:
    with pytest.raises(SecAggAborted, match=f"node {liar} revealed a pair seed for node {gone}"):
        s.server.aggregate()
    assert set(s.server.culprits) == {liar}
    total, _, u3, plain = s.round(3, others)
    np.testing.assert_array_equal(total, expected(plain, u3)[0])


# -- 2. split U3 views with colluding neighbours --------------------------------------
def _split_view_attack(colluders: int, honest_told_active: int):
    """Round 1 of a 10-client session (roster of 10: C = 1, k = 8, t = 5). The
    server colludes with ``colluders`` neighbours of the victim u (they sign any set
    and hand over their pair keys with u); ``honest_told_active`` honest neighbours
    and u are told U3 = everyone, every other client U3 = everyone but u. Returns u's
    exact input if the server recovers it, else None, and what it obtained."""
    s = Session(n=10)
    u = s.ids[0]
    nbrs = s.server.graph[u]
    bad = nbrs[:colluders]
    honest = [v for v in nbrs if v not in bad]
    told_a = set(honest[:honest_told_active]) | {u}
    a = list(s.ids)
    b = [c for c in s.ids if c != u]
    replies, plain = s.inputs(1, s.ids)
    signed = {}
    for c in s.ids:
        if c in bad:
            continue
        view = a if c in told_a else b
        signed[c] = (view, s.clients[c].consistency(1, view))

    def sigs_for(node, view):
        out = {}
        for v in [node, *s.server.graph[node]]:
            if v in bad:
                out[v] = _forged_signature(s, v, 1, view)
            elif v in signed and signed[v][0] == view:
                out[v] = signed[v][1]
        return out

    def ciphertexts_for(node, view):
        return {v: replies[v].ciphertexts[node] for v in s.server.graph[node] if v in view}

    got_self_mask = None
    try:
        got_self_mask = s.clients[u].unmask(1, a, sigs_for(u, a), ciphertexts_for(u, a)).self_mask_seed
    except ProtocolError:
        pass
    seeds = {v: round_pair_seed(s.clients[v].pair_keys[u], _round_digest(s, 1)) for v in bad}
    for h in honest:
        if h in told_a:
            # told u is in the sum: it reveals no pair seed with u, and cannot be
            # made to reveal for the other view
            with pytest.raises(ProtocolError):
                s.clients[h].unmask(1, b, sigs_for(h, b), ciphertexts_for(h, b))
            continue
        try:
            reveal = s.clients[h].unmask(1, b, sigs_for(h, b), ciphertexts_for(h, b))
        except ProtocolError:
            continue
        seeds[h] = reveal.pair_seeds[u]
    if got_self_mask is None or set(seeds) != set(nbrs):
        return None, (got_self_mask is not None, len(seeds), len(nbrs))
    y = replies[u].vector - prg.expand(got_self_mask, D + 1, _bits(s))
    recovered = _strip_pair_masks(s, u, y, seeds)
    np.testing.assert_array_equal(recovered, plain[u])
    return recovered, None


def test_split_views_recover_the_victim_with_t_colluding_neighbours():
    """Positive control: with t colluders (beyond the c < t the policy's 2t > k + c
    assumes) the colluders' signatures alone make u reveal its seed, every honest
    neighbour reveals its pair seed with u, and u's round input is recovered exactly."""
    t = Session(n=10).context.params.reconstruction_threshold
    recovered, _ = _split_view_attack(colluders=t, honest_told_active=0)
    assert recovered is not None


@pytest.mark.parametrize("honest_told_active", [0, 1, 2, 4])
def test_split_views_with_t_minus_1_colluders_never_give_both_seed_and_pair_seeds(honest_told_active):
    """With t - 1 colluders u needs one honest neighbour's signature on a set with u;
    that neighbour never reveals its pair seed with u (nor does u): the server never
    holds u's self-mask seed together with all its pair seeds of the round."""
    t = Session(n=10).context.params.reconstruction_threshold
    recovered, obtained = _split_view_attack(colluders=t - 1, honest_told_active=honest_told_active)
    assert recovered is None, obtained


# -- 3. the t and min_cohort floors on a subset round ----------------------------------
def test_survivor_sets_below_the_threshold_or_outside_the_cohort_are_not_signed():
    s = Session(n=10)
    u = s.ids[0]
    replies, _ = s.inputs(1, s.ids)
    nbrs = s.server.graph[u]
    t = s.context.params.reconstruction_threshold
    short = [c for c in s.ids if c not in nbrs[: len(nbrs) - t + 1]]  # u keeps t - 1 neighbours
    with pytest.raises(ProtocolError, match=f"neighbours are in the sum, reconstruction threshold {t}"):
        s.clients[u].consistency(1, short)
    with pytest.raises(ProtocolError, match="not within the session's cohort"):
        s.clients[u].consistency(1, [*s.ids, 12345])
    with pytest.raises(ProtocolError, match="omits this client"):
        s.clients[u].consistency(1, s.ids[1:])
    # positive control: the full set is signed
    assert len(s.clients[u].consistency(1, s.ids)) == 64


def test_mod_min_cohort_of_the_node_config_holds_when_the_server_asks_a_subset(tmp_path):
    """secagg-min-cohort = 5 in every node's config (and C = 0, so that the cohort floor
    alone binds): a session round whose sum would hold 4 inputs is never signed (nothing
    revealed: no unmask stage runs); the next round sets keys up again (after an abort)
    and gives the exact mean of its 5."""
    fed = ModFederation(6, tmp_path, node_config={"secagg-min-cohort": "5", "secagg-max-colluders": "0"})
    two, one = set(fed.ids[:2]), {fed.ids[0]}

    def drop(nodes):
        return lambda stage, node, msg: None if stage == "masked-input" and node in nodes else msg

    results = run_strategy_rounds(fed, 3, tampers={2: drop(two), 3: drop(one)}, max_colluders=0)
    (_, r1), (agg2, r2), (agg3, r3) = results
    assert r1.aborted is None
    assert agg2 is None and "aborted at consistency" in r2.aborted and "unmask" not in r2.stage_seconds
    assert r3.aborted is None and r3.survivors == 5 and r3.key_setup
    np.testing.assert_allclose(agg3, fed.expected_mean(fed.ids[1:]), atol=SecAggParams(5, 3).step)


# -- 4. the open payload ----------------------------------------------------------------
def _open_with(s: Session, node: int, ads, nonces) -> SessionClient:
    wire = codec.decode(codec.encode(pack_open({"nonces": nonces, "advertisements": ads})))
    return SessionClient.open(
        s.setups[node], unpack_advertisements(wire["advertisements"]), unpack_nonces(wire["nonces"])
    )


def test_a_tampered_open_payload_is_refused_and_a_session_opens_once():
    s = Session(n=8)
    u = s.ids[0]
    payload = s.server.open_payload(u)
    ads, nonces = payload["advertisements"], payload["nonces"]
    other = s.server.graph[u][0]  # a neighbour: its own advertisement is not in its payload
    swapped = dataclasses.replace(ads[0], mask_key=ads[0].encryption_key, encryption_key=ads[0].mask_key)
    fresh = crypto.x25519_keypair()[1]  # the server's own key for a neighbour
    replaced = dataclasses.replace(ads[0], mask_key=fresh)
    cases = [
        ([swapped, *ads[1:]], nonces, "differs from its roster entry"),
        ([replaced, *ads[1:]], nonces, "differs from its roster entry"),
        (ads[1:], nonces, "are missing"),
        (s.server.open_payload(other)["advertisements"], nonces, "are missing|differs"),
        (ads, {k: v for k, v in nonces.items() if k != other}, "graph nonces missing"),
        (ads, {**nonces, other: bytes(32)}, "does not match its commitment"),
    ]
    for bad_ads, bad_nonces, match in cases:
        with pytest.raises(ProtocolError, match=match):
            _open_with(s, u, bad_ads, bad_nonces)
    client = _open_with(s, u, ads, nonces)  # the honest payload opens it
    assert sorted(client.pair_keys) == s.server.graph[u]
    with pytest.raises(ProtocolError, match="already opened"):
        _open_with(s, u, ads, nonces)


def test_a_multi_round_setup_serves_either_a_session_or_per_round_stages_never_both():
    """The per-round share-keys stage would Shamir-share the setup's X25519 mask secret,
    from which every session pair key of the client follows: a multi-round set-up
    refuses it (and then still opens); after the session opened, share-keys (and the
    per-round input) are refused."""
    s = Session(n=6)
    u, v = s.ids[0], s.ids[1]
    payload = s.server.open_payload(u)
    with pytest.raises(ProtocolError, match="never Shamir-shared"):
        s.setups[u].share_keys(payload["advertisements"], payload["nonces"])  # per-round stage 3
    s.open(u)
    s.open(v)
    payload_v = s.server.open_payload(v)
    with pytest.raises((ProtocolError, ValueError)):
        s.setups[v].share_keys(payload_v["advertisements"], payload_v["nonces"])
    with pytest.raises(ProtocolError):
        s.setups[v].masked_input(s.ids, {}, np.zeros(D), 1, s.context.model_hash)


# -- 5. state persistence ---------------------------------------------------------------
@pytest.mark.parametrize("ledger", [False, True], ids=["no-ledger", "round-ledger"])
def test_a_rolled_back_client_never_masks_two_inputs_under_one_round_digest(tmp_path, ledger):
    """Storage rollback: the node's state is restored from a snapshot taken before its
    round-2 input and the server replays round 2 (same model). The replay guard lives in
    that state, so without a node-local round ledger the restored client masks a second
    round-2 input under the same pair masks and the two revealed self-mask seeds give the
    server x1 - x2 exactly (the positive control). With ``secagg-round-ledger`` (a file
    outside the state, written and fsync-ed before an input leaves) the second input is
    refused before anything is masked."""
    s = Session(n=8)
    u = s.ids[0]
    s.open(u)
    if ledger:
        s.clients[u].ledger = RoundLedger(tmp_path / "rounds.json", u)
    s.round(1)
    snapshot = codec.encode(s.clients[u].to_state())  # e.g. a volume snapshot
    replies, plain = s.inputs(2, s.ids)
    s.finish(replies)
    b1, y1 = s.server.reveals[u].self_mask_seed, replies[u].vector
    u3 = s.server.stats.masked
    signatures, _ = s.server.unmask_request(u)
    # the node's state is restored; the ledger file (other storage) is not
    restored = SessionClient.from_state(codec.decode(snapshot), s.secrets[u], s.policy)
    restored.ledger = s.clients[u].ledger
    update, weight = s.updates(2)[u]
    if ledger:
        with pytest.raises(ProtocolError, match="round ledger records an input for round 2"):
            restored.masked_input(2, MODEL, update, weight, rng=np.random.default_rng(99))
        assert restored.last_round == 1  # nothing masked, nothing kept
        return
    second = restored.masked_input(2, MODEL, update, weight, rng=np.random.default_rng(99))
    restored.consistency(2, u3)
    b2 = restored.unmask(2, u3, signatures, {}).self_mask_seed  # the neighbours' old signatures
    diff = (y1 - prg.expand(b1, D + 1, _bits(s))) - (second.vector - prg.expand(b2, D + 1, _bits(s)))
    x2, _ = encode_input(s.context, update, weight, rng=np.random.default_rng(99))
    np.testing.assert_array_equal(diff, plain[u] - x2)  # the leak, without the ledger


def test_a_session_state_read_later_does_not_unmask_earlier_rounds():
    s = Session(n=8)
    u = s.ids[0]
    replies1, plain1 = s.inputs(1, s.ids)
    s.finish(replies1)
    b1 = s.server.reveals[u].self_mask_seed  # u was in the sum: it revealed its seed
    s.round(2)
    s.round(3)
    stolen = codec.decode(codec.encode(s.clients[u].to_state()))  # read after round 3
    seeds = {int(v): round_pair_seed(bytes(k), _round_digest(s, 1)) for v, k in stolen["pair_keys"]}
    y = replies1[u].vector - prg.expand(b1, D + 1, _bits(s))
    assert not np.array_equal(_strip_pair_masks(s, u, y, seeds), plain1[u]), "round 1 input unmasked"


def test_mod_a_node_whose_first_training_failed_rejoins_the_session(tmp_path, caplog):
    fed = ModFederation(6, tmp_path)
    victim = fed.ids[2]
    good = fed.updates[victim].copy()

    def fail_once(stage, node, msg):
        if stage == "masked-input" and node == victim:
            fed.updates[victim] = np.full_like(good, np.nan)
        return msg

    def recover(stage, node, msg):
        fed.updates[victim] = good
        return msg

    results = run_strategy_rounds(fed, 3, tampers={1: fail_once, 2: recover, 3: recover})
    (_, r1), (_, r2), (agg3, r3) = results
    assert r1.survivors == 5  # the failing round: the others complete
    refusals = [r.getMessage() for r in caplog.records if str(victim) in r.getMessage()]
    assert r2.survivors == 6 or r3.survivors == 6, (r2.survivors, r3.survivors, refusals[-1:])


def test_mod_a_second_set_up_with_the_same_context_opens_a_new_session(tmp_path):
    fed = ModFederation(5, tmp_path)
    ((_, first),) = run_strategy_rounds(fed, 1)
    assert first.aborted is None
    results = run_strategy_rounds(fed, 2)  # a new server-side strategy, same run
    assert all(rep.aborted is None and rep.survivors == 5 for _, rep in results), [
        rep.aborted for _, rep in results]


# -- 6. one bad client ------------------------------------------------------------------
def _low_order_key(field_name: str):
    def hook(node, ad, context, secret):
        if node != sorted(context.cohort)[3]:
            return ad
        unsigned = dataclasses.replace(ad, **{field_name: bytes(32)}, signature=b"")
        return dataclasses.replace(
            unsigned, signature=crypto.sign(secret, unsigned.signed_payload(context.digest()))
        )
    return hook


@pytest.mark.parametrize("field_name", ["mask_key", "encryption_key"])
def test_a_member_with_an_invalid_x25519_key_does_not_keep_its_neighbours_out(field_name):
    own, _ = crypto.x25519_keypair()
    with pytest.raises(crypto.CryptoError):  # the key really is unusable
        crypto.agree(own, bytes(32), b"salt", b"info")
    s = AttackSession(n=10, ad_hook=_low_order_key(field_name))
    bad = s.ids[3]
    honest = [c for c in s.ids if c != bad]
    for c in honest:
        s.open(c)
    total, weight, u3, plain = s.round(1, honest)
    assert u3 == honest
    np.testing.assert_array_equal(total, expected(plain, u3)[0])


def test_malformed_inputs_signatures_and_reveals_exclude_their_sender_and_the_round_completes():
    """One malformed message per round, each kind in turn: its sender is excluded (its
    self mask then comes from its neighbours' shares) and the sum is exact."""
    s = Session(n=7)
    r = 0

    def run(tamper_inputs=None, tamper_sigs=None, tamper_reveals=None):
        nonlocal r
        r += 1
        replies, plain = s.inputs(r, s.ids)
        if tamper_inputs:
            tamper_inputs(replies)
        u3 = s.server.receive_masked_inputs(replies)
        sigs = {c: s.clients[c].consistency(r, u3) for c in u3}
        if tamper_sigs:
            tamper_sigs(sigs, u3)
        reveals = {}
        for c in s.server.receive_signatures(sigs):
            signatures, cts = s.server.unmask_request(c)
            reveals[c] = s.clients[c].unmask(r, u3, signatures, cts)
        if tamper_reveals:
            tamper_reveals(reveals, u3)
        s.server.receive_unmask(reveals)
        total, weight = s.server.aggregate()
        exp_total, exp_weight = expected(plain, u3)
        np.testing.assert_array_equal(total, exp_total)
        assert weight == exp_weight
        return u3

    x = s.ids[5]

    def bad_input(change):
        def tamper(replies):
            replies[x] = change(replies[x])
            replies[12345] = replies[s.ids[0]]  # and a node outside the session
        return tamper

    for change in [
        lambda ri: {"vector": ri.vector},
        lambda ri: dataclasses.replace(ri, vector=ri.vector.astype(np.float64)),
        lambda ri: dataclasses.replace(ri, vector=ri.vector.reshape(1, -1)),
        lambda ri: dataclasses.replace(ri, vector=ri.vector.astype(np.uint64)),
        lambda ri: dataclasses.replace(ri, self_mask_commitment=ri.self_mask_commitment[:31]),
        lambda ri: dataclasses.replace(ri, self_mask_commitment="c" * 32),
        lambda ri: dataclasses.replace(ri, ciphertexts=list(ri.ciphertexts.values())),
        lambda ri: dataclasses.replace(ri, ciphertexts=dict(list(ri.ciphertexts.items())[1:])),
        lambda ri: dataclasses.replace(ri, ciphertexts={p: c[:-1] for p, c in ri.ciphertexts.items()}),
    ]:
        u3 = run(tamper_inputs=bad_input(change))
        assert x not in u3 and "malformed" in s.server.stats.excluded[x]
        assert "outside the session" in s.server.stats.excluded[12345]

    for sig in [None, "s" * 64, b"s" * 63, b"\0" * 64]:
        def tamper_sigs(sigs, u3, sig=sig):
            sigs[x] = sig
        u3 = run(tamper_sigs=tamper_sigs)
        assert x in u3 and x not in s.server.stats.signed
    # a valid signature of x over another set (or another round) is not forwarded
    u3 = run(tamper_sigs=lambda sigs, u3: sigs.__setitem__(x, _forged_signature(s, x, r, u3[1:])))
    assert x not in s.server.stats.signed

    def reveal_change(change):
        def tamper(reveals, u3):
            reveals[x] = change(reveals[x], u3)
        return tamper

    for change in [
        lambda rv, u3: None,
        lambda rv, u3: dataclasses.replace(rv, self_mask_seed="b" * 32),
        lambda rv, u3: dataclasses.replace(rv, self_mask_seed=rv.self_mask_seed[:16]),
        lambda rv, u3: dataclasses.replace(rv, pair_seeds={u3[0]: b"p" * 32}),
        lambda rv, u3: dataclasses.replace(rv, pair_seeds=[]),
        lambda rv, u3: dataclasses.replace(rv, shares={p: list(v) for p, v in rv.shares.items()}),
        lambda rv, u3: dataclasses.replace(rv, shares={p: (i + 1, b) for p, (i, b) in rv.shares.items()}),
        lambda rv, u3: dataclasses.replace(rv, shares={**rv.shares, x: (1, b"q" * 32)}),
        lambda rv, u3: dataclasses.replace(rv, shares={p: (i, b[:31]) for p, (i, b) in rv.shares.items()}),
    ]:
        u3 = run(tamper_reveals=reveal_change(change))
        assert x not in s.server.stats.unmasked and "malformed" in s.server.stats.excluded[x]


def test_core_server_excludes_an_input_with_mixed_type_ciphertext_keys():
    s = Session(n=6)
    replies, _ = s.inputs(1, s.ids)
    x = s.ids[0]
    replies[x] = dataclasses.replace(replies[x], ciphertexts={**replies[x].ciphertexts, "1": b"c"})
    u3 = s.server.receive_masked_inputs(replies)
    assert x not in u3


def test_strategy_wire_parsers_refuse_hostile_reveals_with_value_errors_only():
    from flwr_guard.secagg.strategy import _node_id, _reveal

    base = {"seed": b"s" * 32, "shares": {}, "pair_seeds": {}, "bad_senders": []}
    hostile = [
        {},
        {**base, "seed": 5},
        {**base, "seed": {"__b64": "!!"}},
        {**base, "shares": []},
        {**base, "shares": {"1": [True, b"x"]}},
        {**base, "shares": {"1": [1, b"x", 3]}},
        {**base, "shares": {"1": "ab"}},
        {**base, "shares": {"-1": [1, b"x"]}},
        {**base, "shares": {"9" * 21: [1, b"x"]}},
        {**base, "shares": {str(2**64): [1, b"x"]}},
        {**base, "pair_seeds": {"x": b"p"}},
        {**base, "pair_seeds": []},
        {**base, "bad_senders": {"1": 2}},
    ]
    for payload in hostile:
        with pytest.raises((ValueError, KeyError, TypeError)):
            _reveal(payload)
    # what parses keeps only what the core then checks (sizes and relations)
    rv = _reveal({**base, "bad_senders": [1, True, "x", *range(2000)], "pair_seeds": {"7": 5}})
    assert rv.bad_senders[:1] == [1] and len(rv.bad_senders) == 1000 and rv.pair_seeds == {7: 5}
    assert _node_id("18446744073709551615") == 2**64 - 1


# -- 7. hostile server messages to the real mod ---------------------------------------
def _message(node: int, stage: str, payload: dict, model=None):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.app.metadata import Metadata

    from flwr_guard.secagg.constants import SECAGG_RECORD

    content = RecordDict({SECAGG_RECORD: ConfigRecord(
        {"stage": stage, "server-round": 2, "payload": codec.encode(payload)})})
    if model is not None:
        content["arrays"] = model
    meta = Metadata(run_id=1, message_id="x", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="2", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def test_mod_hostile_session_messages_get_named_refusals_and_lose_nothing(tmp_path):
    """Before its real round-2 input, one node gets a volley of hostile session messages
    (wrong types, out-of-range rounds, replays, oversized id lists, unknown sessions,
    malformed maps). Each gets an error reply naming the problem; none changes its state:
    it then takes part in rounds 2 and 3 (whose real input also carries a junk 'open',
    ignored by a node that holds the session) and the sums are exact."""
    from flwr_guard.secagg.constants import SECAGG_RECORD, UNKNOWN_SESSION
    from flwr_guard.secagg.mod import secaggplus_mod

    fed = ModFederation(5, tmp_path)
    node = fed.ids[1]
    refusals: list[tuple[str, str]] = []

    def volley(stage, dst, msg):
        if stage != "masked-input" or dst != node:
            return msg
        record = msg.content.config_records[SECAGG_RECORD]
        real = codec.decode(record["payload"])
        digest, r = real["session"], real["round"]
        model = fed.global_arrays()
        cases = [
            ("masked-input", {"session": digest, "round": r}, None, "ArrayRecords"),
            ("masked-input", {"session": digest, "round": str(r)}, model, "wrong type"),
            ("masked-input", {"session": digest, "round": True}, model, "wrong type"),
            ("masked-input", {"session": digest, "round": float(r)}, model, "wrong type"),
            ("masked-input", {"session": digest, "round": 2**64}, model, "outside [0, 2^63)"),
            ("masked-input", {"session": digest, "round": r - 1}, model, "replayed or rewound"),
            ("masked-input", {"session": digest, "round": -3}, model, "outside [0, 2^63)"),
            ("masked-input", {"session": digest, "round": r + 10_001}, model, UNKNOWN_SESSION),
            ("masked-input", {"session": bytes(32), "round": r}, model, UNKNOWN_SESSION),
            ("masked-input", {"session": bytes(32), "round": r, "open": {"nonces": 5}}, model,
             UNKNOWN_SESSION),
            ("masked-input", {"session": 7, "round": r}, model, "wrong type"),
            ("consistency", {"session": digest, "round": r, "absent": list(range(100_001))}, None,
             "at most 100000"),
            ("consistency", {"session": digest, "round": r, "absent": [-1]}, None, "node ids"),
            ("consistency", {"session": digest, "round": r, "absent": [12345]}, None, "outside the session"),
            ("consistency", {"session": digest, "round": r, "absent": []}, None, "has no input for"),
            ("unmask", {"session": digest, "round": r - 1, "absent": [],
                        "signatures": {"x": bytes(64)}, "ciphertexts": {}}, None, "not a node id"),
            ("unmask", {"session": digest, "round": r - 1, "absent": [],
                        "signatures": {}, "ciphertexts": {str(fed.ids[0]): b"c" * 5}}, None, "bytes"),
            ("unmask", {"session": digest, "round": r - 1, "absent": [],
                        "signatures": {}, "ciphertexts": {}}, None, "already unmasked"),
        ]
        for kind, payload, arrays, match in cases:
            reply = secaggplus_mod(_message(node, kind, payload, arrays), fed.contexts[node], fed._train)
            assert reply.has_error(), (kind, payload)
            refusals.append((match, reply.error.reason))
        real["open"] = {"nonces": b"junk", "advertisements": 12}
        record["payload"] = codec.encode(real)
        return msg

    results = run_strategy_rounds(fed, 3, tampers={2: volley, 3: volley})
    for match, reason in refusals:
        assert match in reason, (match, reason)
    for agg, rep in results:
        assert rep.aborted is None and rep.survivors == 5
        np.testing.assert_allclose(agg, fed.expected_mean(fed.ids), atol=SecAggParams(5, 3).step)


# -- 8. hostile client replies to the real strategy -----------------------------------
class ReplyTamperFederation(ModFederation):
    """:class:`ModFederation` whose ``reply_tamper(stage, node, reply)`` rewrites what a
    node's mod answered (a misbehaving client) before the strategy pulls it."""

    reply_tamper = None

    def deliver(self, msg):
        from flwr_guard.secagg.constants import SECAGG_RECORD

        stage = str(msg.content.config_records[SECAGG_RECORD]["stage"])
        reply = super().deliver(msg)
        if reply is not None and self.reply_tamper is not None:
            self.reply_tamper(stage, msg.metadata.dst_node_id, reply)
        return reply


def _set_payload(reply, payload=None, raw=None):
    from flwr.app import ConfigRecord

    from flwr_guard.secagg.constants import SECAGG_RECORD

    reply.content[SECAGG_RECORD] = ConfigRecord({"payload": raw if raw is not None else codec.encode(payload)})


def test_strategy_one_client_with_hostile_replies_at_each_session_stage_is_excluded(tmp_path):
    """One client answers each session stage with a hostile reply in turn (wrong types,
    bad ids, a float vector, two arrays, an oversized payload, no secagg record, shares
    of nodes it does not hold): the strategy never raises, excludes it, and the round
    completes with the exact mean of the sum's members."""
    from flwr.app import ArrayRecord

    from flwr_guard.secagg.constants import MASKED_ARRAYS, SECAGG_RECORD

    fed = ReplyTamperFederation(6, tmp_path)
    bad = fed.ids[4]
    plan = {
        2: ("masked-input", lambda rep: _set_payload(rep, {"commitment": 5, "ciphertexts": {"-1": b"x"}})),
        3: ("masked-input", lambda rep: rep.content.__setitem__(
            MASKED_ARRAYS, ArrayRecord(numpy_ndarrays=[np.zeros(fed.d + 1, dtype=np.float64)]))),
        4: ("masked-input", lambda rep: rep.content.__setitem__(
            MASKED_ARRAYS, ArrayRecord(numpy_ndarrays=[np.zeros(3, dtype=np.uint32)] * 2))),
        5: ("masked-input", lambda rep: _set_payload(rep, raw=b"{" * (4 * 2**20 + 1))),
        6: ("consistency", lambda rep: _set_payload(rep, {"signature": 123})),
        7: ("consistency", lambda rep: rep.content.config_records.pop(SECAGG_RECORD)),
        8: ("unmask", lambda rep: _set_payload(rep, {"seed": b"s" * 32, "shares": {"1": [1, b"y" * 32]},
                                                     "pair_seeds": {}, "bad_senders": []})),
        9: ("unmask", lambda rep: _set_payload(rep, {"seed": [1, 2], "shares": "x", "pair_seeds": 3})),
    }
    current = {"round": 0}

    def tamper(stage, node, reply):
        want = plan.get(current["round"])
        if want and node == bad and stage == want[0]:
            want[1](reply)

    fed.reply_tamper = tamper
    def counting(r):
        def mark(stage, node, msg):
            current["round"] = r
            return msg

        return mark

    results = run_strategy_rounds(fed, 9, tampers={r: counting(r) for r in range(1, 10)})
    others = [i for i in fed.ids if i != bad]
    for r, (agg, rep) in enumerate(results, start=1):
        assert rep.aborted is None, (r, rep.aborted)
        stage = plan.get(r, ("",))[0]
        in_sum = others if stage == "masked-input" else fed.ids
        assert rep.survivors == len(in_sum), (r, rep.survivors)
        if stage in ("consistency", "unmask"):
            assert rep.dropouts[stage] == 1, (r, rep.dropouts)
        np.testing.assert_allclose(agg, fed.expected_mean(in_sum), atol=SecAggParams(5, 3).step)
    assert not any(rep.key_setup for _, rep in results[1:])  # no re-key forced


def test_strategy_a_clients_clipped_count_is_bounded_by_the_update_length(tmp_path):
    from flwr_guard.secagg.constants import SECAGG_RECORD

    fed = ReplyTamperFederation(5, tmp_path)
    bad = fed.ids[0]

    def inflate(stage, node, reply):
        if stage == "masked-input" and node == bad and SECAGG_RECORD in reply.content.config_records:
            payload = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
            _set_payload(reply, {**payload, "clipped": 10**30})

    fed.reply_tamper = inflate
    ((_, rep),) = run_strategy_rounds(fed, 1)
    assert rep.clipped_values <= len(fed.ids) * fed.d, rep.clipped_values


def test_mod_a_session_round_over_a_subset_is_not_unmasked_below_the_noise_contributors(tmp_path):
    from flwr_guard.keys import TrainConfig

    fed = ModFederation(6, tmp_path, node_config={"dp-min-noise-multiplier": "1.0",
                                                  "dp-honest-contributors": 6})
    fed.weights = {i: 1 for i in fed.ids}  # one clipped update each, as DP requires

    def distributed_dp(asked):
        def tamper(stage, node, msg):
            if stage != "masked-input":
                return msg
            if node not in asked:
                return None
            config = msg.content.config_records["config"]
            config[TrainConfig.DP_NOISE_MULTIPLIER] = 1.0
            config[TrainConfig.DP_CLIPPING_NORM] = 1.0
            config[TrainConfig.DP_MIN_CONTRIBUTORS] = 6
            config[TrainConfig.DP_QUANTIZATION_STEP] = 2 * 2.0 / 2**16
            return msg

        return tamper

    results = run_strategy_rounds(fed, 2, tampers={1: distributed_dp(set(fed.ids)),
                                                   2: distributed_dp(set(fed.ids[:4]))})
    (agg1, r1), (_, r2) = results
    assert r1.aborted is None and r1.survivors == 6  # the full cohort: all the noise
    assert np.abs(agg1 - fed.expected_mean(fed.ids)).max() > 10 * SecAggParams(5, 3).step  # noised
    assert r2.aborted is not None, f"a sum of {r2.survivors} unmasked, noise scaled for 6"


def test_per_round_clients_do_not_unmask_a_sum_below_their_min_cohort():
    import secagg_harness as harness

    r = harness.make_round(10, 20, seed=1)
    policy = federation_policy([c.signing_secret for c in r.clients.values()], min_cohort=9)
    for client in r.clients.values():
        client.policy = policy
    ids = sorted(r.clients)
    try:
        _, _, active = harness.run(r, drop={"masked-input": set(ids[:3])})
    except ProtocolError:  # PolicyViolation included
        return  # refused
    assert len(active) >= policy.min_cohort, f"a sum of {len(active)} inputs was unmasked"
