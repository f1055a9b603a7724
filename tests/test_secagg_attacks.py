"""SecAgg+ against a deviating server (with colluding clients where the attack needs
them): each attack of issue 10 is refused or leaves the victim's update unrecoverable;
with the protection off (or its assumption broken) the same attack succeeds.

Core-level: honest :class:`SecAggClient` state machines and a server that deviates.
Mod-level (``test_mod_*``): the real ``secaggplus_mod`` on real Flower Messages, driven
by the real ``SecAggPlus`` strategy through an in-process Grid (``secagg_harness``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_harness import (
    ModFederation,
    expected_mean,
    federation_policy,
    make_round,
    mean_of,
    roster_stage,
    run_strategy_round,
    setup,
    share_keys,
)

from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.client import SecAggClient
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.messages import MASK_KEY, SELF_MASK, Advertisement, RosterEntry
from flwr_guard.secagg.params import (
    SecAggParams,
    choose_parameters,
    failure_probabilities,
)
from flwr_guard.secagg.policy import PolicyViolation, SecAggPolicy
from flwr_guard.secagg.quantization import quantize
from flwr_guard.secagg.server import SecAggServer
from flwr_guard.secagg.transcripts import consistency_payload, pairwise_seed, pairwise_sign


def _context(ids, k, t, d=20):
    params = SecAggParams(k, t)
    return RoundContext(7, 1, tuple(sorted(ids)), params, d + 1, b"h" * 32)


# -- 1. Sybil cohort -----------------------------------------------------------------
def test_sybil_cohort_is_refused_with_a_roster_and_reaches_share_keys_without() -> None:
    honest_secret = crypto.ed25519_keypair()[0]
    sybils = {i: crypto.ed25519_keypair()[0] for i in (11, 12, 13, 14)}  # the server's own
    victim_id = 10
    ctx = _context([victim_id, *sybils], k=4, t=3)
    sybil_clients = {i: SecAggClient(i, s, SecAggPolicy(trust_on_first_use=True)) for i, s in sybils.items()}

    def attempt(policy):
        victim = SecAggClient(victim_id, honest_secret, policy)
        ads = [victim.advertise(ctx)] + [c.advertise(ctx) for c in sybil_clients.values()]
        return victim.receive_roster([RosterEntry.of(a) for a in ads])

    # The roster lists the victim and two real members; the server's ids are not on it.
    members = federation_policy([honest_secret, crypto.ed25519_keypair()[0], crypto.ed25519_keypair()[0]])
    with pytest.raises(PolicyViolation, match="not on the federation roster"):
        attempt(members)
    # Without a roster (trust on first use) nothing can tell a Sybil from a member: the
    # victim reveals its nonce and would go on to share keys (the documented limit).
    assert len(attempt(SecAggPolicy(trust_on_first_use=True))) == 32
    # Without a roster and without opting in, the client refuses to run at all.
    with pytest.raises(PolicyViolation, match="no federation roster.*secagg-roster"):
        SecAggClient(victim_id, honest_secret).advertise(ctx)


def test_one_key_under_two_ids_is_refused() -> None:
    secret = crypto.ed25519_keypair()[0]
    others = [crypto.ed25519_keypair()[0] for _ in range(3)]
    policy = SecAggPolicy(trust_on_first_use=True)
    ctx = _context([1, 2, 3, 4, 5], k=4, t=3)
    victim = SecAggClient(1, secret, policy)
    ads = [victim.advertise(ctx)] + [SecAggClient(i, s, policy).advertise(ctx) for i, s in zip((2, 3, 4), others)]
    ads.append(SecAggClient(5, others[0], policy).advertise(ctx))  # node 2's key again
    with pytest.raises(ProtocolError, match="same key.*Sybil"):
        victim.receive_roster([RosterEntry.of(a) for a in ads])


@pytest.mark.parametrize(
    ("ids", "k", "t", "policy", "match"),
    [
        ([1, 2], 1, 1, SecAggPolicy(trust_on_first_use=True), "cohort of 2.*at least 3"),
        (range(1, 21), 13, 7, SecAggPolicy(trust_on_first_use=True), r"c = 1 .*2t > k \+ c, i\.e\. t >= 8"),
        (range(1, 8), 6, 4, SecAggPolicy(trust_on_first_use=True, max_colluders=2),
         r"C = 2 colluding members \(secagg-max-colluders=2\).*c = 2 corrupt neighbours.*t >= 5"),
        (range(1, 11), 3, 2, SecAggPolicy(trust_on_first_use=True, min_num_shares=5),
         "num_shares 3.*at least 5"),
        (range(1, 11), 9, 5, SecAggPolicy(trust_on_first_use=True, min_reconstruction_threshold=6),
         "reconstruction_threshold 5.*at least 6"),
    ],
)
def test_server_asking_for_less_than_the_policy_is_refused(ids, k, t, policy, match) -> None:
    ids = list(ids)
    client = SecAggClient(ids[0], crypto.ed25519_keypair()[0], policy)
    # 2t > k (the old rule, still checked by SecAggParams) may hold while 2t > k + c fails.
    params = SecAggParams(k, t)
    ctx = RoundContext(7, 1, tuple(ids), params, 5, b"h" * 32)
    with pytest.raises(PolicyViolation, match=match):
        client.advertise(ctx)
    assert client.context is None  # nothing generated, nothing sent


# -- 2. Split dropout views + colluders --------------------------------------------------
def _split_view_attack(t: int, max_colluders: int, split: int, seed: int = 1):
    """Full graph of 6 (k = 5), 2 colluding share holders. The server tells ``split`` of
    the victim's 3 honest holders "the victim survived" (they reveal its self-mask
    seed) and the others "it dropped" (they reveal its mask key); the colluders give
    both and sign both survivor sets. Returns the victim's recovered weighted,
    quantised update (or ``None``) and the round."""
    n, k = 6, 5
    r = make_round(n=n, d=30, seed=seed, params=SecAggParams(k, t))
    for c in r.clients.values():
        object.__setattr__(c, "policy", dataclasses.replace(c.policy, max_colluders=max_colluders))
    ids = sorted(r.clients)
    victim, colluders = ids[0], ids[1:3]
    honest = ids[3:]
    ctx = r.server.context
    routed = setup(r)
    masked = {}
    for c in ids:
        vector, _, _ = r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                                 ctx.model_hash, rng=np.random.default_rng(c))
        masked[c] = vector
    r.server.receive_masked_inputs({c: (v, []) for c, v in masked.items()})
    group_a, group_b = honest[:split], honest[split:]
    view_a, view_b = list(ids), [c for c in ids if c != victim]
    client = r.clients[victim]
    sig = {}
    for c in [victim, *group_a]:
        sig.setdefault("a", {})[c] = r.clients[c].consistency(view_a)
    for c in group_b:
        sig.setdefault("b", {})[c] = r.clients[c].consistency(view_b)
    for c in colluders:  # corrupt: sign both views
        for view, name in ((view_a, "a"), (view_b, "b")):
            payload = consistency_payload(ctx.digest(), r.clients[c].roster_hash, r.clients[c].seed, view)
            sig.setdefault(name, {})[c] = crypto.sign(r.clients[c].signing_secret, payload)
    shares = {SELF_MASK: [], MASK_KEY: []}
    for c in colluders:
        index, b_share, s_share = r.clients[c].held_shares[victim]
        shares[SELF_MASK].append((index, b_share))
        shares[MASK_KEY].append((index, s_share))
    for group, view, dropped, name in ((group_a, view_a, [], "a"), (group_b, view_b, [victim], "b")):
        for c in group:
            try:
                out = r.clients[c].unmask(view, dropped, sig.get(name, {}))
            except ProtocolError:
                continue
            kind, index, share = out[victim]
            shares[kind].append((index, share))
    try:
        seed = crypto.combine_shares(shares[SELF_MASK], t)
        mask_secret = crypto.combine_shares(shares[MASK_KEY], t)
    except crypto.CryptoError:
        return None, r
    bits = ctx.params.modulus_bits
    y = masked[victim] - prg.expand(seed, ctx.vector_length, bits)
    for peer in client.neighbour_ids:
        pair = prg.expand(pairwise_seed(mask_secret, client.advertisements[peer].mask_key, ctx.digest()),
                          ctx.vector_length, bits)
        y = y - pair if pairwise_sign(victim, peer) > 0 else y + pair
    return y, r


def test_split_views_with_colluders_recover_the_victim_when_2t_is_at_most_k_plus_c() -> None:
    # t = 3 = floor(k/2) + 1 (the old default): 2t = 6 <= k + c = 7, and the policy
    # assumed no colluder (C = 0: the old gamma 0.05 of a cohort of 6): one honest
    # holder told "it survived", two told "it dropped", and the attack recovers the
    # exact input.
    y, r = _split_view_attack(t=3, max_colluders=0, split=1)
    victim = min(r.clients)
    p = r.server.context.params
    q, _ = quantize(r.updates[victim], p.clipping_range, p.quantization_range, np.random.default_rng(victim))
    assert y is not None
    assert np.array_equal(y[:-1].astype(np.int64), q * r.weights[victim])
    assert int(y[-1]) == r.weights[victim]


def test_policy_for_two_colluders_refuses_t3_and_with_t4_no_split_recovers_the_victim() -> None:
    # C = 2 colluders: c = 2 on the complete graph of 6, so t >= 4 (2t > k + c = 7).
    with pytest.raises(PolicyViolation, match=r"C = 2 colluding.*c = 2.*t >= 4"):
        _split_view_attack(t=3, max_colluders=2, split=1)
    for split in range(4):  # every way to split the 3 honest holders
        y, _ = _split_view_attack(t=4, max_colluders=2, split=split)
        assert y is None
    # The default bound of this roster of 6 (C = ceil(0.05 x 6) = 1) refuses t = 3 too.
    with pytest.raises(PolicyViolation, match=r"C = 1 colluding members \(ceil\(secagg-corrupt-fraction 0.05 x roster of 6\)\).*t >= 4"):
        _split_view_attack(t=3, max_colluders=None, split=1)


# -- 3. Graph steering and pin poisoning ---------------------------------------------
def test_forged_entry_of_a_non_neighbour_is_refused_and_pins_nothing() -> None:
    r = make_round(n=12, d=10, seed=3, num_shares=4)
    tofu = SecAggPolicy(trust_on_first_use=True)
    for c in r.clients.values():
        object.__setattr__(c, "policy", tofu)
    ctx = r.server.context
    ids = sorted(r.clients)
    roster = r.server.receive_advertisements({c: r.clients[c].advertise(ctx) for c in ids})
    me = ids[0]
    target = ids[-1]
    # The server forges the entry of some node (its own key, a garbage signature), as
    # the old client accepted for non-neighbours, which then pinned the forged key.
    forged = [dataclasses.replace(e, signing_key=crypto.ed25519_keypair()[1]) if e.node_id == target else e
              for e in roster]
    with pytest.raises(ProtocolError, match=f"roster entry of node {target} does not verify"):
        r.clients[me].receive_roster(forged)
    assert r.clients[me].pinned_keys == {} and r.clients[me].roster == {}
    # The real roster is still accepted afterwards: no key was locked out.
    assert len(r.clients[me].receive_roster(roster)) == 32
    assert r.clients[me].pinned_keys[target] == crypto.ed25519_public(r.clients[target].signing_secret)


def test_graph_depends_on_nonces_revealed_after_the_roster_is_fixed() -> None:
    # Same cohort, same roster entries: the graph still changes with the honest
    # clients' nonces, which the server learns only once every entry is fixed.
    r = make_round(n=16, d=10, seed=4, num_shares=4)
    ctx = r.server.context
    ids = sorted(r.clients)
    graphs = []
    for _ in range(2):
        server = SecAggServer(ctx)
        r.server = server
        for c in r.clients.values():
            c.roster, c.seed = {}, b""
        server.receive_advertisements({c: r.clients[c].advertise(ctx) for c in ids})
        server.receive_nonces(roster_stage(r, ids))
        graphs.append(server.graph)
    assert graphs[0] != graphs[1]
    # A nonce the server (or a corrupt client) changes after committing is refused.
    other = dict(r.server.nonces)
    other[ids[3]] = crypto.random_secret()
    with pytest.raises(ProtocolError, match="does not match its commitment"):
        r.clients[ids[0]].share_keys(r.server.neighbour_advertisements(ids[0]), other)


def test_clients_shown_different_rosters_refuse_at_unmask() -> None:
    # The server omits one member from one client's roster (to steer its graph). The
    # client then derives another roster digest, which is in every consistency
    # signature: its neighbours' signatures do not verify for it (and its own would not
    # verify for them, nor for the honest server core).
    from flwr_guard.secagg.transcripts import roster_digest

    r = make_round(n=6, d=10, seed=5)
    ctx = r.server.context
    ids = sorted(r.clients)
    routed = setup(r)
    replies = {c: r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                            ctx.model_hash)[:2] for c in ids}
    u3 = r.server.receive_masked_inputs(replies)
    victim, left_out = ids[0], ids[5]
    shown = roster_digest([e for e in r.server.roster() if e.node_id != left_out])
    assert shown != r.clients[victim].roster_hash
    r.clients[victim].roster_hash = shown  # what it would hold had it been shown that roster
    signatures = {c: r.clients[c].consistency(u3) for c in u3}
    with pytest.raises(ProtocolError, match="consistency signature of node .* is invalid"):
        r.clients[victim].unmask(u3, [], r.server.unmask_signatures(victim) | {
            c: signatures[c] for c in r.clients[victim].neighbour_ids})
    r.server.receive_signatures(signatures)
    assert "does not verify" in r.server.stats.excluded[victim]
    # And a client refuses the nonces of a roster it was not shown.
    fresh = make_round(n=6, d=10, seed=5)
    roster = fresh.server.receive_advertisements({c: fresh.clients[c].advertise(fresh.server.context)
                                                  for c in sorted(fresh.clients)})
    me = roster[0].node_id
    nonces = {e.node_id: fresh.clients[e.node_id].receive_roster(roster) for e in roster if e.node_id != me}
    nonces[me] = fresh.clients[me].receive_roster(roster[:-1])
    fresh.server.receive_nonces(nonces)
    with pytest.raises(ProtocolError, match="graph nonces missing or extra"):
        fresh.clients[me].share_keys(fresh.server.neighbour_advertisements(me), fresh.server.nonces)


# -- 5. One bad client does not sink the round --------------------------------------
def test_false_bad_sender_reports_exclude_the_liar_and_the_round_completes() -> None:
    r = make_round(n=9, d=40, seed=6)
    ctx = r.server.context
    ids = sorted(r.clients)
    routed = setup(r)
    liar = ids[4]
    replies = {}
    for c in ids:
        v, bad, _ = r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c], ctx.model_hash)
        replies[c] = (v, list(routed[c]) if c == liar else bad)  # it "reports" every neighbour
    u3 = r.server.receive_masked_inputs(replies)
    assert set(u3) == set(ids) - {liar}
    assert "made by it" in r.server.stats.excluded[liar]
    active, dropped, _ = r.server.receive_signatures({c: r.clients[c].consistency(u3) for c in u3})
    r.server.receive_unmask({c: r.clients[c].unmask(active, dropped, r.server.unmask_signatures(c))
                             for c in active})
    total, weight = r.server.aggregate()
    assert weight == sum(r.weights[c] for c in u3)
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, u3)).max() < ctx.params.step


def test_invalid_consistency_signature_is_dropped_not_forwarded() -> None:
    r = make_round(n=7, d=30, seed=7)
    ctx = r.server.context
    ids = sorted(r.clients)
    routed = setup(r)
    replies = {c: r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                            ctx.model_hash)[:2] for c in ids}
    u3 = r.server.receive_masked_inputs(replies)
    signatures = {c: r.clients[c].consistency(u3) for c in u3}
    bad = ids[2]
    signatures[bad] = bytes(64)  # the old server forwarded this, and every neighbour refused
    active, dropped, sigs = r.server.receive_signatures(signatures)
    assert bad not in sigs and "does not verify" in r.server.stats.excluded[bad]
    r.server.receive_unmask({c: r.clients[c].unmask(active, dropped, r.server.unmask_signatures(c))
                             for c in sigs})
    total, weight = r.server.aggregate()
    assert weight == sum(r.weights.values())  # its input is in the sum, its mask removed
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, ids)).max() < ctx.params.step


@pytest.mark.parametrize("kind", [SELF_MASK, MASK_KEY])
def test_a_wrong_revealed_share_is_detected_its_sender_excluded_and_the_round_completes(kind) -> None:
    r = make_round(n=9, d=30, seed=8)
    ctx = r.server.context
    ids = sorted(r.clients)
    routed = setup(r)
    gone = ids[1] if kind == MASK_KEY else None
    senders = [c for c in ids if c != gone]
    replies = {c: r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                            ctx.model_hash)[:2] for c in senders}
    u3 = r.server.receive_masked_inputs(replies)
    active, dropped, _ = r.server.receive_signatures({c: r.clients[c].consistency(u3) for c in u3})
    reveals = {c: r.clients[c].unmask(active, dropped, r.server.unmask_signatures(c)) for c in active}
    target = gone if kind == MASK_KEY else ids[0]
    cheat = next(c for c in active if target in reveals[c] and c != target)
    k_, index, share = reveals[cheat][target]
    reveals[cheat][target] = (k_, index, bytes(b ^ 1 for b in share))
    # Put the wrong share first so the first t shares fail.
    ordered = {cheat: reveals.pop(cheat), **reveals}
    r.server.receive_unmask(ordered)
    total, weight = r.server.aggregate()
    assert f"wrong {kind} share of node {target}" in r.server.stats.excluded[cheat]
    assert weight == sum(r.weights[c] for c in u3)
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, u3)).max() < ctx.params.step


# -- 6. Input validation before allocation --------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("encryption_key", 10**9), ("signature", "x" * 64), ("node_id", -1), ("node_id", 2**64),
     ("mask_key", bytes(10**6)), ("node_id", True)],
)
def test_hostile_advertisement_fields_are_refused_before_allocation(field, value) -> None:
    ad = SecAggClient(3, crypto.ed25519_keypair()[0], SecAggPolicy(trust_on_first_use=True)).advertise(
        _context([3, 4, 5], 2, 2))
    data = ad.to_dict()
    data[field] = value
    with pytest.raises(ProtocolError, match="malformed advertisement"):
        Advertisement.from_dict(data)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d["params"].update(clipping_range=float("inf")), "clipping_range"),
        (lambda d: d["params"].update(num_shares=10**9), "num_shares"),
        (lambda d: d.update(cohort=[-1, 2, 3]), "uint64"),
        (lambda d: d.update(cohort=[1, 1, 2]), "repeats"),
        (lambda d: d.update(vector_length=2**40), "vector_length"),
        (lambda d: d.update(model_hash=32), "model_hash"),
        (lambda d: d.update(run_id="7"), "run_id"),
    ],
)
def test_hostile_round_context_is_refused_with_a_named_field(change, match) -> None:
    data = _context([1, 2, 3], 2, 2).to_dict()
    change(data)
    with pytest.raises(ValueError, match=match):
        RoundContext.from_dict(data)


def test_server_survives_malformed_replies_at_every_stage() -> None:
    r = make_round(n=12, d=20, seed=9)
    ctx = r.server.context
    ids = sorted(r.clients)
    ads = {c: r.clients[c].advertise(ctx) for c in ids}
    ads[ids[6]] = "not an advertisement"
    roster = r.server.receive_advertisements(ads)
    assert ids[6] in r.server.stats.excluded
    u1 = [e.node_id for e in roster]
    r.server.receive_nonces(roster_stage(r, u1))
    shares = {c: share_keys(r, c) for c in u1}
    shares[ids[5]] = {k: 10**9 for k in shares[ids[5]]}  # JSON ints where bytes belong
    routed = r.server.receive_shares(shares)
    assert ids[5] not in routed and "malformed share" in r.server.stats.excluded[ids[5]]
    replies = {c: r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                            ctx.model_hash)[:2] for c in routed}
    replies[ids[4]] = ("vector", "bads")
    u3 = r.server.receive_masked_inputs(replies)
    assert ids[4] not in u3
    sigs = {c: r.clients[c].consistency(u3) for c in u3}
    sigs[ids[3]] = 10**9
    active, dropped, ok = r.server.receive_signatures(sigs)
    reveals = {c: r.clients[c].unmask(active, dropped, r.server.unmask_signatures(c)) for c in ok}
    reveals[ids[2]] = {ids[0]: ("self-mask", 10**9, bytes(10**5))}
    r.server.receive_unmask(reveals)
    _, weight = r.server.aggregate()
    assert weight == sum(r.weights[c] for c in u3)
    assert set(r.server.stats.excluded) >= {ids[2], ids[3], ids[4], ids[5], ids[6]}


# -- parameters -------------------------------------------------------------------
def test_default_parameters_and_their_documented_failure_bounds() -> None:
    # docs/secagg.md, "Parameters from the theory" (gamma 0.05, delta 1/3, sigma 40, eta 0.01)
    expected = {20: (14, 8, 1), 100: (64, 35, 5), 1000: (300, 171, 41)}
    for n, (k, t, c) in expected.items():
        choice = choose_parameters(n)
        assert (choice.num_shares, choice.reconstruction_threshold, choice.corrupt_neighbours) == (k, t, c)
        assert 2 * t > k + c
        assert choice.security_failure <= 2.0**-40 and choice.correctness_failure <= 0.01
        assert SecAggParams.for_cohort(n).num_shares == k
    # The old default at n = 100 (k = 14, t = 8) aborts most rounds with a third dropping.
    assert failure_probabilities(100, 14, 8)[1] == 1.0


# -- 4. Model binding and the other attacks through the real mod --------------------------
def test_mod_honest_round_gives_the_weighted_average(tmp_path) -> None:
    fed = ModFederation(6, tmp_path)
    agg, report = run_strategy_round(fed)
    assert report.aborted is None and report.survivors == 6
    assert np.abs(agg - fed.expected_mean(fed.ids)).max() < SecAggParams(5, 3).step
    assert all(names == ["arrays"] for names in fed.seen.values())


@pytest.mark.parametrize("stage", ["advertise", "share-keys", "masked-input", "consistency", "unmask"])
def test_mod_one_dropout_at_each_stage_still_gives_the_exact_survivor_sum(tmp_path, stage) -> None:
    fed = ModFederation(7, tmp_path, seed=1)
    gone = fed.ids[2]
    fed.tamper = lambda s, node, msg: None if (s == stage and node == gone) or (
        node == gone and _after(s, stage)) else msg
    agg, report = run_strategy_round(fed, multi_round=False)  # the per-round stages
    assert report.aborted is None
    in_sum = fed.ids if stage in ("consistency", "unmask") else [i for i in fed.ids if i != gone]
    assert report.survivors == len(in_sum)
    assert np.abs(agg - fed.expected_mean(in_sum)).max() < SecAggParams(5, 3).step


def _after(stage: str, dropped_at: str) -> bool:
    order = ["advertise", "roster", "share-keys", "masked-input", "consistency", "unmask"]
    return order.index(stage) > order.index(dropped_at)


def test_mod_dropout_at_the_roster_stage_is_left_out_before_any_share(tmp_path) -> None:
    # Silent at the roster stage: a fresh set-up without it (no share was ever sent),
    # and the round gives the exact mean of the other five.
    fed = ModFederation(6, tmp_path)
    gone = fed.ids[0]
    fed.tamper = lambda s, node, msg: None if s != "advertise" and node == gone else msg
    for multi_round in (False, True):
        agg, report = run_strategy_round(fed, multi_round=multi_round)
        assert report.aborted is None and report.survivors == 5, report
        assert report.setup_attempts == 2 and report.dropouts["roster"] == 1
        assert "graph nonce" in report.excluded[str(gone)]
        assert np.abs(agg - fed.expected_mean(fed.ids[1:])).max() < SecAggParams(5, 3).step
        assert not any(m.metadata.dst_node_id == gone for m in fed.pushed
                       if "share-keys" in str(m.content.config_records.get("secagg", {}).get("stage")))


def test_mod_decoy_first_array_record_is_refused(tmp_path) -> None:
    from flwr.app import ArrayRecord, RecordDict

    fed = ModFederation(6, tmp_path)
    victim = fed.ids[0]

    def decoy(stage, node, msg):
        if stage == "masked-input" and node == victim:
            content = RecordDict({"decoy": ArrayRecord(numpy_ndarrays=[np.ones(fed.d, dtype=np.float32)]),
                                  **dict(msg.content.items())})
            msg.content = content
        return msg

    fed.tamper = decoy
    _, report = run_strategy_round(fed)
    assert victim not in fed.seen  # the user's train function never ran for it
    assert report.aborted is None and report.survivors == 5  # an honest round without it


def _instruct(fed: ModFederation, node: int, stage: str, payload: dict):
    """A deviating server's own message to ``node``'s real mod; returns the reply."""
    import time

    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.app.metadata import Metadata

    from flwr_guard.secagg import codec
    from flwr_guard.secagg.constants import SECAGG_RECORD

    content = RecordDict({SECAGG_RECORD: ConfigRecord(
        {"stage": stage, "server-round": 1, "payload": codec.encode(payload)})})
    meta = Metadata(run_id=1, message_id="x", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return fed.deliver(Message(content=content, metadata=meta))


def _payload(reply) -> dict:
    from flwr_guard.secagg import codec
    from flwr_guard.secagg.constants import SECAGG_RECORD

    assert not reply.has_error(), reply.error.reason
    return codec.decode(bytes(reply.content.config_records[SECAGG_RECORD]["payload"]))


def test_mod_refuses_a_sybil_cohort_and_a_round_below_its_policy(tmp_path) -> None:
    from flwr_guard.secagg.messages import pack_roster

    fed = ModFederation(4, tmp_path)
    sybils = {i: SecAggClient(i, crypto.ed25519_keypair()[0], SecAggPolicy(trust_on_first_use=True))
              for i in (91, 92, 93, 94)}
    ctx = RoundContext(1, 1, tuple(sorted([*fed.ids, *sybils])), SecAggParams(6, 4), fed.d + 1, b"h" * 32)
    ads = [Advertisement.from_dict(_payload(_instruct(fed, i, "advertise", {"context": ctx.to_dict()}))["advertisement"])
           for i in fed.ids]
    ads += [s.advertise(ctx) for s in sybils.values()]
    roster = pack_roster(sorted((RosterEntry.of(a) for a in ads), key=lambda e: e.node_id))
    for node in fed.ids:
        reply = _instruct(fed, node, "roster", {"roster": roster})
        assert reply.has_error() and "not on the federation roster" in reply.error.reason
    # A server that asks for a cohort of 2 with t = 1, or of 3 (below C + 3 = 4 for the
    # roster of 4), is refused at once, before any key is generated.
    for params, cohort, match in (
        (SecAggParams(1, 1), fed.ids[:2], "cohort of 2"),
        (SecAggParams(2, 2), fed.ids[:3], "cohort of 3: with up to C = 1 colluding members"),
        (SecAggParams(2, 2), fed.ids, None),
    ):
        c = RoundContext(1, 1, tuple(cohort), params, fed.d + 1, b"h" * 32)
        reply = _instruct(fed, cohort[0], "advertise", {"context": c.to_dict()})
        if match:
            assert reply.has_error() and match in reply.error.reason
        else:
            assert not reply.has_error()  # n = 4, k = 2, t = 2 meets the default policy (c = 1)
    bad = ctx.to_dict()
    bad["params"]["clipping_range"] = float("inf")
    reply = _instruct(fed, fed.ids[0], "advertise", {"context": bad})
    assert reply.has_error() and "clipping_range" in reply.error.reason


def test_mod_never_crashes_on_hostile_payloads(tmp_path) -> None:
    fed = ModFederation(4, tmp_path)
    node = fed.ids[0]
    ctx = RoundContext(1, 1, tuple(fed.ids), SecAggParams(2, 2), fed.d + 1, b"h" * 32)
    hostile = [
        ("advertise", {"context": {**ctx.to_dict(), "cohort": [-1, 1, 2, 3]}}, "uint64"),
        ("advertise", {"context": {**ctx.to_dict(), "vector_length": 10**12}}, "vector_length"),
        ("roster", {"roster": 12}, "no SecAgg+ round in progress"),
    ]
    for stage, payload, match in hostile:
        reply = _instruct(fed, node, stage, payload)
        assert reply.has_error() and match in reply.error.reason, reply.error.reason
    _payload(_instruct(fed, node, "advertise", {"context": ctx.to_dict()}))
    for stage, payload, match in [
        ("roster", {"roster": 10**9}, "wrong type"),
        ("roster", {"roster": bytes(167)}, "whole entries"),
        ("share-keys", {"nonces": b"", "advertisements": b""}, "share-keys before the roster"),
        ("consistency", {"survivors": [-1]}, "node ids"),
        ("unmask", {"active": [], "dropped": [], "signatures": {"x": b""}}, "not a node id"),
        ("no-such-stage", {}, "unknown SecAgg+ stage"),
    ]:
        reply = _instruct(fed, node, stage, payload)
        assert reply.has_error() and match in reply.error.reason, (stage, reply.error.reason)


def test_mod_without_roster_or_opt_in_refuses_naming_the_fix(tmp_path) -> None:
    fed = ModFederation(4, tmp_path, roster=False)
    reply = _instruct(fed, fed.ids[0], "advertise", {"context": RoundContext(
        1, 1, tuple(fed.ids), SecAggParams(3, 2), fed.d + 1, b"h" * 32).to_dict()})
    assert reply.has_error() and "no federation roster" in reply.error.reason
    assert "secagg-trust-on-first-use=true" in reply.error.reason
    agg, report = run_strategy_round(fed)
    assert agg is None and "aborted at advertise" in report.aborted
    (tmp_path / "tofu").mkdir()
    fed = ModFederation(4, tmp_path / "tofu", roster=False,
                        node_config={"secagg-trust-on-first-use": "true"})
    agg, report = run_strategy_round(fed)
    assert report.aborted is None and agg is not None


def test_mod_server_matching_the_clients_gamma_runs_and_a_lower_one_is_refused(tmp_path) -> None:
    # Clients assume 2 colluders among 8 (gamma 0.25); a server choosing for gamma 0.05
    # asks for a t they refuse; one choosing for their gamma is accepted.
    fed = ModFederation(8, tmp_path, node_config={"secagg-corrupt-fraction": "0.25"})
    agg, report = run_strategy_round(fed)
    assert agg is None and "aborted at advertise" in report.aborted
    agg, report = run_strategy_round(fed, corrupt_fraction=0.25)
    assert report.aborted is None
    assert 2 * report.reconstruction_threshold > report.num_shares + 2
    assert np.abs(agg - fed.expected_mean(fed.ids)).max() < SecAggParams(7, 5).step
