"""SecAgg+ core: exact sums, dropouts, what the server sees, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from secagg_harness import UNIFORM_P_FLOOR, expected_mean, make_round, mean_of, run

from flwr_guard.secagg import crypto
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.messages import Advertisement
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.quantization import quantize
from flwr_guard.secagg.server import SecAggAborted


def test_sum_is_exact_and_average_within_one_quantisation_step() -> None:
    r = make_round(n=6, d=500)
    total, weight, survivors = run(r)
    assert sorted(survivors) == sorted(r.clients)
    assert weight == sum(r.weights.values())
    # Exactness: the unmasked total is the sum of what each client quantised.
    p = r.server.context.params
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, survivors)).max() < p.step


@pytest.mark.parametrize("stage", ["advertise", "share-keys", "masked-input", "consistency", "unmask"])
def test_a_third_dropping_at_each_stage_gives_the_exact_survivor_sum(stage: str) -> None:
    r = make_round(n=9, d=200, seed=3)
    dropped = set(sorted(r.clients)[::3])  # 3 of 9
    total, weight, survivors = run(r, drop={stage: dropped})
    in_sum = set(survivors)
    if stage in ("advertise", "share-keys", "masked-input"):
        assert in_sum == set(r.clients) - dropped
    else:  # dropped after sending their masked input: their input stays in the sum
        assert in_sum == set(r.clients)
    assert weight == sum(r.weights[c] for c in in_sum)
    step = r.server.context.params.step
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, sorted(in_sum))).max() < step


def test_a_third_dropping_spread_over_all_stages_with_sparse_graph() -> None:
    r = make_round(n=15, d=100, seed=5, num_shares=10)
    ids = sorted(r.clients)
    drop = {"advertise": {ids[0]}, "share-keys": {ids[1]}, "masked-input": {ids[2], ids[3]},
            "unmask": {ids[4]}}
    total, weight, survivors = run(r, drop=drop)
    assert set(survivors) == set(ids) - {ids[0], ids[1], ids[2], ids[3]}
    step = r.server.context.params.step
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, survivors)).max() < step


def test_below_threshold_aborts_with_a_clear_error() -> None:
    r = make_round(n=6, d=50)
    with pytest.raises(SecAggAborted, match="reconstruction threshold"):
        run(r, drop={"masked-input": set(sorted(r.clients)[:4])})


def test_server_view_masked_vectors_are_uniform_and_uncorrelated() -> None:
    r = make_round(n=5, d=20_000, seed=11)
    run(r)
    bits = r.server.context.params.modulus_bits
    for node, vector in r.masked.items():
        u = vector[:-1].astype(np.float64) / 2.0**bits
        assert stats.kstest(u, "uniform").pvalue > UNIFORM_P_FLOOR
        assert abs(np.corrcoef(u, r.updates[node])[0, 1]) < 0.05
    # Knowing every other client's masked vector does not help either: the
    # difference of two masked vectors is still uniform.
    a, b = list(r.masked.values())[:2]
    diff = (a - b)[:-1].astype(np.float64) / 2.0**bits
    assert stats.kstest(diff, "uniform").pvalue > UNIFORM_P_FLOOR
    # Positive controls: the same checks see an unmasked quantised update, and a
    # mask whose top bit is set 55 % of the time instead of 50 %.
    p = r.server.context.params
    node = sorted(r.updates)[0]
    rng = np.random.default_rng(0)
    q, _ = quantize(r.updates[node], p.clipping_range, p.quantization_range, rng)
    plain = q.astype(np.float64) / p.quantization_range
    assert stats.kstest(plain, "uniform").pvalue < UNIFORM_P_FLOOR
    biased = rng.random(20_000) * 0.5 + 0.5 * (rng.random(20_000) < 0.55)
    assert stats.kstest(biased, "uniform").pvalue < UNIFORM_P_FLOOR


def test_model_inconsistency_is_refused_by_the_client() -> None:
    r = make_round(n=4, d=10)
    victim = sorted(r.clients)[0]
    with pytest.raises(ProtocolError, match="model"):
        run(r, model_hashes={victim: b"x" * 32})


def test_different_round_context_per_client_is_refused() -> None:
    r = make_round(n=4, d=10)
    ctx = r.server.context
    ids = sorted(r.clients)
    import dataclasses

    from flwr_guard.secagg.messages import RosterEntry

    other = dataclasses.replace(ctx, model_hash=b"y" * 32)  # server lies to one client
    ads = [r.clients[i].advertise(other if i == ids[0] else ctx) for i in ids]
    with pytest.raises(ProtocolError, match="another run, round, cohort, parameters or model"):
        r.clients[ids[1]].receive_roster([RosterEntry.of(a) for a in ads])


def test_substituted_signing_key_is_refused_with_trusted_keys() -> None:
    from flwr_guard.secagg.messages import RosterEntry
    from flwr_guard.secagg.policy import SecAggPolicy

    r = make_round(n=4, d=10)
    ids = sorted(r.clients)
    ctx = r.server.context
    ads = [r.clients[i].advertise(ctx) for i in ids]
    trusted = {i: crypto.ed25519_public(r.clients[i].signing_secret) for i in ids}
    # The server replaces node 1's keys with its own, correctly self-signed ones.
    impostor = type(r.clients[ids[1]])(ids[1], crypto.ed25519_keypair()[0],
                                        SecAggPolicy(trust_on_first_use=True))
    ads[1] = impostor.advertise(ctx)
    r.clients[ids[0]].trusted_keys = trusted
    with pytest.raises(ProtocolError, match="unexpected key"):
        r.clients[ids[0]].receive_roster([RosterEntry.of(a) for a in ads])


def _to_consistency(r):
    from secagg_harness import setup

    ctx = r.server.context
    ids = sorted(r.clients)
    routed = setup(r)
    replies = {}
    for c in ids:
        v, bad, _ = r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c], ctx.model_hash)
        replies[c] = (v, bad)
    u3 = r.server.receive_masked_inputs(replies)
    return ids, u3, {c: r.clients[c].consistency(u3) for c in u3}


def test_overlapping_active_and_dropped_lists_are_refused() -> None:
    r = make_round(n=5, d=10)
    ids, u3, sigs = _to_consistency(r)
    with pytest.raises(ProtocolError, match="both active and dropped"):
        r.clients[ids[0]].unmask(u3, [ids[1]], sigs)


def test_client_never_reveals_both_shares_of_a_peer() -> None:
    r = make_round(n=5, d=10)
    ids, u3, sigs = _to_consistency(r)
    first = r.clients[ids[0]].unmask(u3, [], sigs)
    assert {kind for kind, _, _ in first.values()} == {"self-mask"}
    # A second request that now calls a peer dropped (to get its mask key) is refused.
    with pytest.raises(ProtocolError):
        r.clients[ids[0]].unmask([c for c in u3 if c != ids[1]], [ids[1]], sigs)


def test_unmask_needs_threshold_valid_signatures() -> None:
    r = make_round(n=5, d=10)
    ids, u3, sigs = _to_consistency(r)
    few = dict(list(sigs.items())[:1])  # t = 2 at n = 5
    with pytest.raises(ProtocolError, match="consistency signatures"):
        r.clients[ids[0]].unmask(u3, [], few)
    forged = dict(sigs)
    forged[ids[1]] = bytes(64)
    with pytest.raises(ProtocolError, match="invalid"):
        r.clients[ids[0]].unmask(u3, [], forged)


def test_malformed_shares_exclude_the_sender_not_the_round() -> None:
    r = make_round(n=9, d=50, seed=2)
    ctx = r.server.context
    ids = sorted(r.clients)
    cheat = ids[2]
    shares = _shares(r)
    victim = next(iter(shares[cheat]))
    shares[cheat][victim] = bytes(len(shares[cheat][victim]))  # garbage for one neighbour
    routed = r.server.receive_shares(shares)
    replies = {}
    for c in ids:
        v, bad, _ = r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c], ctx.model_hash)
        replies[c] = (v, bad)
    assert replies[victim][1] == [cheat]
    # A wrong-length vector from another client excludes that client too.
    liar = next(c for c in ids if c not in (cheat, victim))
    replies[liar] = (replies[liar][0][:-3], [])
    u3 = r.server.receive_masked_inputs(replies)
    # One report, one disputed pair: both ends are out of the sum (one of them lied).
    assert set(u3) == set(ids) - {cheat, liar, victim}
    active, dropped, sigs = r.server.receive_signatures({c: r.clients[c].consistency(u3) for c in u3})
    r.server.receive_unmask({c: r.clients[c].unmask(active, dropped, sigs) for c in active})
    total, weight = r.server.aggregate()
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, active)).max() < ctx.params.step
    assert set(r.server.stats.excluded) == {cheat, liar, victim}


def test_quantisation_is_unbiased_and_refuses_nan() -> None:
    rng = np.random.default_rng(0)
    x = np.full(200_000, 0.123)
    q, clipped = quantize(x, 1.0, 16, rng)
    assert clipped == 0
    assert abs(q.mean() * 2 / 16 - 1 - 0.123) < 1e-3
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([1.0, np.nan]), 1.0, 16, rng)


def test_modulus_is_chosen_so_the_sum_cannot_wrap() -> None:
    small = SecAggParams.for_cohort(20, quantization_range=2**16, max_weight=2**10)
    assert small.modulus_bits == 32 and 20 * 2**10 * 2**16 < 2**32
    large = SecAggParams.for_cohort(100, quantization_range=2**16, max_weight=2**12)
    assert large.modulus_bits == 64
    assert SecAggParams.for_cohort(31).modulus_bits == 32  # default max_weight 2^11
    assert SecAggParams.for_cohort(32).modulus_bits == 64
    with pytest.raises(ValueError, match="num_shares/2"):
        SecAggParams(num_shares=6, reconstruction_threshold=3)


def test_a_64_bit_modulus_is_logged_with_the_max_weight_that_keeps_32_bits(caplog) -> None:
    with caplog.at_level("WARNING", logger="flwr_guard.secagg.params"):
        SecAggParams.for_cohort(20, quantization_range=2**16, max_weight=2**12)
        SecAggParams.for_cohort(20, quantization_range=2**16, max_weight=2**12)  # once only
        SecAggParams.for_cohort(20, quantization_range=2**16, max_weight=2**11)  # 32 bits
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "64-bit" in message and "max_weight to <= 3276" in message
    assert 20 * 3276 * 2**16 < 2**32 <= 20 * 3277 * 2**16


def test_shamir_on_raw_32_byte_secrets() -> None:
    secret = crypto.random_secret()
    shares = crypto.share_secret(secret, 3, 5)
    assert crypto.combine_shares(shares[1:4], 3) == secret
    with pytest.raises(crypto.CryptoError):
        crypto.combine_shares(shares[:2], 3)


def test_advertisement_roundtrip() -> None:
    r = make_round(n=4, d=4)  # a roster of 4: C = 1, sums of C + 3 = 4
    ad = r.clients[sorted(r.clients)[0]].advertise(r.server.context)
    assert Advertisement.from_dict(ad.to_dict()) == ad


def test_masked_metrics_reveal_only_their_sum() -> None:
    from flwr_guard.secagg.context import RoundContext

    r = make_round(n=5, d=30, seed=9)
    ctx = r.server.context
    ctx2 = RoundContext(ctx.run_id, ctx.server_round, ctx.cohort, ctx.params,
                        30 + 2 + 1, ctx.model_hash, ("dp-weight", "dp-unclipped-count"))
    r.server = type(r.server)(ctx2)
    ids = sorted(r.clients)
    bits = {c: i % 2 for i, c in enumerate(ids)}
    from secagg_harness import setup

    routed = setup(r)
    replies = {}
    for c in ids:
        v, bad, _ = r.clients[c].masked_input(
            list(routed), routed[c], r.updates[c], r.weights[c], ctx2.model_hash,
            metric_values=[1, bits[c]],
        )
        replies[c] = (v, bad)
    with pytest.raises(ValueError, match="masked metrics"):
        r.clients[ids[0]].masked_input(list(routed), routed[ids[0]], r.updates[ids[0]], 3,
                                       ctx2.model_hash, metric_values=[0.5, 1])
    u3 = r.server.receive_masked_inputs(replies)
    active, dropped, sigs = r.server.receive_signatures({c: r.clients[c].consistency(u3) for c in u3})
    r.server.receive_unmask({c: r.clients[c].unmask(active, dropped, sigs) for c in active})
    total, weight = r.server.aggregate()
    assert total[30:].tolist() == [5, sum(bits.values())]
    assert np.abs(mean_of(r, total[:30], weight) - expected_mean(r, active)).max() < ctx.params.step


def test_share_keys_are_agreed_once_kept_in_the_state_and_erased_after_use() -> None:
    from flwr_guard.secagg import codec
    from flwr_guard.secagg.client import SecAggClient

    r = make_round(n=5, d=10)
    ctx = r.server.context
    ids = sorted(r.clients)
    routed = r.server.receive_shares(_shares(r))
    # Through the mod's serialisation (context.state): the X25519 secret is gone, the
    # k derived keys survive.
    for c in ids:
        state = codec.decode(codec.encode(r.clients[c].to_state()))
        assert state["encryption_secret"] == b""
        assert {p for p, _ in state["share_encryption_keys"]} == set(r.clients[c].neighbour_ids)
        r.clients[c] = SecAggClient.from_state(state, r.clients[c].signing_secret, r.clients[c].policy)
    me = ids[0]
    _, bad, _ = r.clients[me].masked_input(list(routed), routed[me], r.updates[me], r.weights[me],
                                           ctx.model_hash)
    assert bad == [] and set(r.clients[me].held_shares) == set(r.clients[me].neighbour_ids)
    assert r.clients[me].share_encryption_keys == {}
    # A second masked input (same masks, new input) would reveal the difference.
    with pytest.raises(ProtocolError, match="already sent"):
        r.clients[me].masked_input(list(routed), routed[me], r.updates[me], r.weights[me],
                                   ctx.model_hash)


def _shares(r, nodes=None):
    """Advertise and roster stages, then every client's share-keys reply (not yet routed)."""
    from secagg_harness import roster_stage, share_keys

    ctx = r.server.context
    nodes = sorted(r.clients) if nodes is None else nodes
    u1 = r.server.receive_advertisements({c: r.clients[c].advertise(ctx) for c in nodes})
    r.server.receive_nonces(roster_stage(r, [e.node_id for e in u1]))
    return {c: share_keys(r, c) for c in nodes}


def _keyed_round(n: int, k: int, seed: int):
    r = make_round(n=n, d=20, seed=seed, num_shares=k)
    ids = sorted(r.clients)
    return r, ids, _shares(r)


def _masked_replies(r, routed, senders):
    ctx = r.server.context
    out = {}
    for c in senders:
        v, bad, _ = r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                              ctx.model_hash)
        out[c] = (v, bad)
    return out


def test_round_that_cannot_complete_aborts_right_after_masked_input() -> None:
    # k = 4, t = 3: two dropped neighbours of one survivor leave 2 holders of its seed.
    r, ids, shares = _keyed_round(n=12, k=4, seed=4)
    graph = r.server.graph
    victim = ids[0]
    gone = set(graph[victim][:2])
    routed = r.server.receive_shares(shares)
    replies = _masked_replies(r, routed, [c for c in ids if c not in gone])
    with pytest.raises(SecAggAborted, match=rf"after masked-input: .*node {victim} is in the sum "
                       r"but only 2 of its neighbours.*threshold 3.*no shares revealed"):
        r.server.receive_masked_inputs(replies)
    # Nothing was asked of the clients after their masked input; nothing revealed.
    assert r.server.stats.signed == [] and r.server.revealed == {} and r.server.masked_sum is None
    assert all(c.signed_survivors is None and c.revealed == {} for c in r.clients.values())


def test_dropped_client_with_too_few_share_holders_aborts_right_after_masked_input() -> None:
    # A client sends garbage shares to 2 of its 4 neighbours: they report it, it is
    # excluded, and only 2 holders of its mask key remain (t = 3), while its pairwise
    # masks are in the sum of the others.
    r, ids, shares = _keyed_round(n=12, k=4, seed=6)
    cheat = ids[3]
    for victim in list(shares[cheat])[:2]:
        shares[cheat][victim] = bytes(len(shares[cheat][victim]))
    routed = r.server.receive_shares(shares)
    replies = _masked_replies(r, routed, ids)
    with pytest.raises(SecAggAborted, match=rf"node {cheat} dropped and only 2 of its neighbours"):
        r.server.receive_masked_inputs(replies)
    assert set(r.server.stats.excluded) == {cheat} and "bad-share reports" in r.server.stats.excluded[cheat]
    assert r.server.revealed == {}


def test_dropouts_within_tolerance_do_not_abort_early() -> None:
    # k = 4, t = 3: one dropped client; each survivor loses at most one neighbour.
    r, ids, shares = _keyed_round(n=12, k=4, seed=8)
    routed = r.server.receive_shares(shares)
    survivors = ids[1:]
    u3 = r.server.receive_masked_inputs(_masked_replies(r, routed, survivors))
    active, dropped, sigs = r.server.receive_signatures({c: r.clients[c].consistency(u3) for c in u3})
    # O(k) unmask requests: each client gets its own and its neighbours' signatures only.
    graph = r.server.graph
    requests = {c: r.server.unmask_signatures(c) for c in active}
    assert all(set(requests[c]) == ({c, *graph[c]} & set(active)) for c in active)
    assert max(len(v) for v in requests.values()) <= 5 < len(sigs)
    r.server.receive_unmask({c: r.clients[c].unmask(active, dropped, requests[c]) for c in active})
    total, weight = r.server.aggregate()
    step = r.server.context.params.step
    assert dropped == [ids[0]]
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, active)).max() < step


def _share_keys_setup(n: int, k: int, seed: int = 5):
    from secagg_harness import roster_stage

    r = make_round(n=n, d=20, seed=seed, num_shares=k)
    ctx = r.server.context
    ids = sorted(r.clients)
    r.server.receive_advertisements({c: r.clients[c].advertise(ctx) for c in ids})
    r.server.receive_nonces(roster_stage(r, ids))
    return r, ids


def test_share_keys_message_is_the_nonces_plus_k_advertisements() -> None:
    from secagg_harness import share_keys_payload

    from flwr_guard.secagg import codec
    from flwr_guard.secagg.messages import ADVERTISEMENT_BYTES, NONCE_ENTRY_BYTES

    r = make_round(n=40, d=20, seed=5, num_shares=6)
    total, weight, survivors = run(r)  # drives every stage through the wire payloads
    ids = sorted(r.clients)
    payload = codec.decode(share_keys_payload(r.server, ids[0]))
    assert len(payload["nonces"]) == 40 * NONCE_ENTRY_BYTES
    assert len(payload["advertisements"]) == 6 * ADVERTISEMENT_BYTES
    assert weight == sum(r.weights.values())
    assert np.abs(mean_of(r, total, weight) - expected_mean(r, survivors)).max() < r.server.context.params.step
    for c in ids:  # each client keeps only its own and its neighbours' advertisements
        client = r.clients[c]
        assert set(client.advertisements) == {c, *client.neighbour_ids}
        assert set(client.roster) == set(ids) and set(client.pinned_keys) == set(ids)


def test_neighbour_advertisement_differing_from_the_roster_is_refused() -> None:
    r, ids = _share_keys_setup(n=12, k=4)
    me = ids[0]
    ads = r.server.neighbour_advertisements(me)
    victim = ads[0].node_id
    # The server swaps a neighbour's keys for its own, correctly self-signed ones, and
    # leaves the roster (so the graph) alone.
    impostor = type(r.clients[victim])(victim, r.clients[victim].signing_secret, r.clients[victim].policy)
    ads[0] = impostor.advertise(r.server.context)
    with pytest.raises(ProtocolError, match="differs from its roster entry"):
        r.clients[me].share_keys(ads, r.server.nonces)


def test_missing_neighbour_advertisement_or_nonce_is_refused() -> None:
    r, ids = _share_keys_setup(n=12, k=4)
    me = ids[0]
    ads = r.server.neighbour_advertisements(me)
    with pytest.raises(ProtocolError, match="missing"):
        r.clients[me].share_keys(ads[1:], r.server.nonces)
    fewer = dict(r.server.nonces)
    fewer.pop(ids[5])
    with pytest.raises(ProtocolError, match="graph nonces missing"):
        r.clients[me].share_keys(ads, fewer)
    other = dict(r.server.nonces)
    other[ids[5]] = bytes(32)
    with pytest.raises(ProtocolError, match="does not match its commitment"):
        r.clients[me].share_keys(ads, other)


def test_malformed_payloads_are_refused() -> None:
    from flwr_guard.secagg.messages import ROSTER_ENTRY_BYTES, unpack_advertisements, unpack_nonces, unpack_roster

    with pytest.raises(ProtocolError):
        unpack_roster(bytes(ROSTER_ENTRY_BYTES - 1))
    with pytest.raises(ProtocolError):
        unpack_advertisements(bytes(199))
    with pytest.raises(ProtocolError):
        unpack_nonces(bytes(39))
    with pytest.raises(ProtocolError):
        unpack_nonces(bytes(80))  # node 0 twice
    r, ids = _share_keys_setup(n=6, k=4)
    bad = Advertisement(ids[0], bytes(33), bytes(32), bytes(32), bytes(32), bytes(32), bytes(64))
    with pytest.raises(ProtocolError):
        bad.to_bytes()
