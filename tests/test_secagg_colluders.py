"""SecAgg+ against a server with colluding federation members (issue 20, item 1), and the
client's cap on a multi-round session's length (item 4).

The client assumes at most C corrupt members of the federation: ``secagg-max-colluders``
or ``ceil(gamma x roster size)`` (gamma 0.05), never a fraction of the cohort the server
picks. Each attack below is a deviating server with colluders, refused at the default
settings with up to C colluders; each has a positive control that recovers the victim's
exact (weighted, quantised) update under the old assumption (C = 0: the old gamma 0.05
applied to a cohort of 3 to 19 is 0 colluders).

Core-level: honest :class:`SecAggClient` / :class:`SessionClient` state machines, a server
that deviates and colluders that hand it their inputs, keys and signatures. Mod-level
(``test_mod_*``): the real ``secaggplus_mod`` and ``SecAggPlus`` strategy in process.
"""

from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest
from secagg_harness import (
    ModFederation,
    Round,
    expected_mean,
    mean_of,
    run,
    run_strategy_round,
    run_strategy_rounds,
    setup,
)
from test_secagg_session import D, Session

from flwr_guard.secagg import codec, crypto, prg
from flwr_guard.secagg.client import SecAggClient, encode_input
from flwr_guard.secagg.constants import UNKNOWN_SESSION
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.messages import MASK_KEY, SELF_MASK, pack_roster, unpack_roster
from flwr_guard.secagg.params import SecAggParams, choose_parameters, colluders_for
from flwr_guard.secagg.policy import PolicyViolation, Roster, RosterMember, SecAggPolicy
from flwr_guard.secagg.server import SecAggServer
from flwr_guard.secagg.session_client import SessionClient
from flwr_guard.secagg.session_server import SessionServer
from flwr_guard.secagg.transcripts import consistency_payload, pairwise_seed, pairwise_sign

ROSTER = 40  # C = ceil(0.05 x 40) = 2 colluders at the default gamma
D_ROUND = 20
OLD = {"max_colluders": 0}  # the old assumption: no colluder in a cohort below 20


@functools.cache
def _federation(size: int = ROSTER, seed: int = 0):
    """``size`` members: ids, signing secrets and the roster of their public keys (the
    same federation for the same arguments)."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < size:
        i = int(rng.integers(1, 2**62))
        if i not in ids:
            ids.append(i)
    secrets = {i: crypto.ed25519_keypair()[0] for i in ids}
    roster = Roster(tuple(RosterMember(crypto.ed25519_public(secrets[i]), f"m{j}") for j, i in enumerate(ids)))
    return ids, secrets, roster


def _read_victim(total: np.ndarray, weight: int, plain: dict, colluders, bits: int) -> np.ndarray:
    """What the server does with the sum: subtract the colluders' own inputs (they hand
    them over). Returns the rest as a vector of ``vector_length`` (update, weight)."""
    dtype = prg.mask_dtype(bits)
    rest = np.concatenate([total.astype(dtype), np.array([weight], dtype=dtype)])
    for c in colluders:
        rest -= plain[c]
    return rest


# -- a per-round round driven by a deviating server ----------------------------------------
def _per_round(cohort, secrets, policy, params, left_out=(), seed=0):
    """Set up a per-round round over ``cohort``; every client masks its input, the server
    leaves ``left_out`` out of the sum (it calls them dropped) and unmasks the rest.
    Returns ``(total, weight, plain inputs, context)``; raises what a client raises."""
    ctx = RoundContext(7, 1, tuple(sorted(cohort)), params, D_ROUND + 1, b"h" * 32)
    clients = {i: SecAggClient(i, secrets[i], policy) for i in cohort}
    rng = np.random.default_rng(seed)
    updates = {i: rng.normal(0, 0.3, D_ROUND) for i in cohort}
    weights = {i: int(rng.integers(1, 100)) for i in cohort}
    r = Round(clients, SecAggServer(ctx), updates, weights)
    routed = setup(r)
    plain, replies = {}, {}
    for c in cohort:
        vector, bad, _ = clients[c].masked_input(list(routed), routed[c], updates[c], weights[c],
                                                 ctx.model_hash, rng=np.random.default_rng(c))
        plain[c], _ = encode_input(ctx, updates[c], weights[c], rng=np.random.default_rng(c))
        if c not in left_out:
            replies[c] = (vector, bad)
    # The server asks every client it keeps for its signature on the sum it chose.
    u3 = sorted(replies)
    signatures = {c: clients[c].consistency(u3) for c in u3}
    assert r.server.receive_masked_inputs(replies) == u3
    active, dropped, _ = r.server.receive_signatures(signatures)
    r.server.receive_unmask({c: clients[c].unmask(active, dropped, r.server.unmask_signatures(c))
                             for c in active})
    total, weight = r.server.aggregate()
    return total, weight, plain, ctx


def test_the_colluder_bound_comes_from_the_roster_never_from_the_cohort() -> None:
    for size, c, floor in ((3, 1, 4), (20, 1, 4), (21, 2, 5), (40, 2, 5), (41, 3, 6), (1000, 50, 53)):
        policy = SecAggPolicy(roster=_federation(size)[2])
        assert (policy.colluders, policy.min_sum) == (c, floor)
    roster = _federation(ROSTER)[2]
    assert SecAggPolicy(roster=roster, max_colluders=5).min_sum == 8
    assert SecAggPolicy(roster=roster, min_honest_others=4).min_sum == 7
    # Without a roster (trust on first use) C is unknown: the sum floor is min_cohort.
    tofu = SecAggPolicy(trust_on_first_use=True)
    assert (tofu.colluders, tofu.min_sum) == (None, 3)
    assert SecAggPolicy(trust_on_first_use=True, max_colluders=2).min_sum == 5
    with pytest.raises(ValueError, match="min_honest_others must be >= 1"):
        SecAggPolicy(min_honest_others=0)


# -- attack 1: a per-round cohort of the victim and C colluders -----------------------------
def test_per_round_cohort_of_the_victim_and_two_colluders_is_refused() -> None:
    ids, secrets, roster = _federation()
    victim, colluders = ids[0], ids[1:3]
    cohort = [victim, *colluders]
    params = SecAggParams.for_cohort(3, max_colluders=0)  # what the old clients accepted
    with pytest.raises(PolicyViolation, match=(
        r"the server announced a cohort of 3: with up to C = 2 colluding members "
        r"\(ceil\(secagg-corrupt-fraction 0.05 x roster of 40\)\) a sum must hold C \+ 1 \+ 2 = 5 inputs"
    )):
        _per_round(cohort, secrets, SecAggPolicy(roster=roster), params)
    # Positive control (old assumption, C = 0): the round completes and the server reads
    # the victim's exact update off the sum.
    total, weight, plain, ctx = _per_round(cohort, secrets, SecAggPolicy(roster=roster, **OLD), params)
    got = _read_victim(total, weight, plain, colluders, ctx.params.modulus_bits)
    np.testing.assert_array_equal(got, plain[victim])


def test_per_round_honest_members_called_dropped_leave_a_sum_the_victim_does_not_sign() -> None:
    ids, secrets, roster = _federation()
    victim, colluders, honest = ids[0], ids[1:3], ids[3:5]
    # One honest fourth member: the cohort of 4 is below C + 3 = 5 at once.
    with pytest.raises(PolicyViolation, match="announced a cohort of 4: with up to C = 2"):
        _per_round([victim, *colluders, honest[0]], secrets, SecAggPolicy(roster=roster),
                   SecAggParams.for_cohort(4, max_colluders=0))
    # Two: the cohort passes, the server calls both dropped and asks the victim to sign
    # a sum of 3 (itself and the 2 colluders). It refuses: nothing is revealed.
    cohort = [victim, *colluders, *honest]
    params = SecAggParams.for_cohort(5, max_colluders=2)
    with pytest.raises(PolicyViolation, match=(
        r"a survivor set \(the inputs of the sum\) of 3: with up to C = 2 colluding members .* "
        r"C \+ 1 \+ 2 = 5 inputs, so that this client's input is summed with at least 2 honest others"
    )):
        _per_round(cohort, secrets, SecAggPolicy(roster=roster), params, left_out=honest)
    # Positive control (C = 0): the same deviation gives the victim's exact update.
    old = SecAggParams.for_cohort(4, max_colluders=0)
    total, weight, plain, ctx = _per_round([victim, *colluders, honest[0]], secrets,
                                           SecAggPolicy(roster=roster, **OLD), old, left_out=honest[:1])
    got = _read_victim(total, weight, plain, colluders, ctx.params.modulus_bits)
    np.testing.assert_array_equal(got, plain[victim])


# -- attack 2: split survivor views on the sparse graph (n = 10, k = 7, t = 4) --------------
def _split_plan(graph, victim, colluders, t):
    """The deviating server's search: over every way to tell each honest client "the
    victim is in the sum" (view A) or "it dropped" (view B), one where the honest
    neighbours of the victim that would reveal give, with the colluders' shares, t shares
    of its self-mask seed (view A) and t of its mask key (view B). ``None``: none exists."""
    honest = [c for c in graph if c != victim and c not in colluders]
    for bits in itertools.product((0, 1), repeat=len(honest)):
        in_a = {h for h, b in zip(honest, bits, strict=True) if b == 0}
        in_b = set(honest) - in_a
        signers_a, signers_b = in_a | {victim, *colluders}, in_b | set(colluders)
        reveal_a = [h for h in in_a if sum(v in signers_a for v in graph[h]) >= t]
        reveal_b = [h for h in in_b if sum(v in signers_b for v in graph[h]) >= t]
        near = set(graph[victim])
        if (len(colluders) + len(near & set(reveal_a)) >= t
                and len(colluders) + len(near & set(reveal_b)) >= t):
            return in_a, in_b
    return None


def _split_view_round(policy, params, seed):
    """A round of 10 out of the roster of 40; returns ``(round, routed, masked, plain,
    victim, colluders)`` after every input is in (the graph is the nonces' draw)."""
    ids, secrets, _ = _federation()
    cohort = ids[10 * seed: 10 * seed + 10]
    ctx = RoundContext(7, 1, tuple(sorted(cohort)), params, D_ROUND + 1, b"h" * 32)
    rng = np.random.default_rng(seed)
    r = Round({i: SecAggClient(i, secrets[i], policy) for i in cohort}, SecAggServer(ctx),
              {i: rng.normal(0, 0.3, D_ROUND) for i in cohort}, {i: int(rng.integers(1, 100)) for i in cohort})
    routed = setup(r)
    masked, plain = {}, {}
    for c in cohort:
        masked[c], _, _ = r.clients[c].masked_input(list(routed), routed[c], r.updates[c], r.weights[c],
                                                    ctx.model_hash, rng=np.random.default_rng(c))
        plain[c], _ = encode_input(ctx, r.updates[c], r.weights[c], rng=np.random.default_rng(c))
    r.server.receive_masked_inputs({c: (v, []) for c, v in masked.items()})
    victim = min(cohort)
    colluders = r.server.graph[victim][:2]
    return r, masked, plain, victim, colluders


def _split_view_attack(policy, params, seed):
    """Run the split-view attack; returns the victim's recovered input or ``None``."""
    r, masked, plain, victim, colluders = _split_view_round(policy, params, seed)
    t, graph, ctx = params.reconstruction_threshold, r.server.graph, r.server.context
    plan = _split_plan(graph, victim, colluders, t)
    if plan is None:
        return None, plain[victim]
    in_a, in_b = plan
    view_a, view_b = sorted(graph), sorted(c for c in graph if c != victim)
    signed = {"a": {victim: r.clients[victim].consistency(view_a)}, "b": {}}
    for h in in_a:
        signed["a"][h] = r.clients[h].consistency(view_a)
    for h in in_b:
        signed["b"][h] = r.clients[h].consistency(view_b)
    for c in colluders:  # corrupt: sign both views
        for view, name in ((view_a, "a"), (view_b, "b")):
            payload = consistency_payload(ctx.digest(), r.clients[c].roster_hash, r.clients[c].seed, view)
            signed[name][c] = crypto.sign(r.clients[c].signing_secret, payload)
    shares: dict[str, list] = {SELF_MASK: [], MASK_KEY: []}
    for c in colluders:
        index, b_share, s_share = r.clients[c].held_shares[victim]
        shares[SELF_MASK].append((index, b_share))
        shares[MASK_KEY].append((index, s_share))
    for group, view, dropped, name in ((in_a, view_a, [], "a"), (in_b, view_b, [victim], "b")):
        for h in group:
            mine = {v: s for v, s in signed[name].items() if v == h or v in graph[h]}
            try:
                out = r.clients[h].unmask(view, dropped, mine)
            except ProtocolError:
                continue
            if victim in out:
                kind, index, share = out[victim]
                shares[kind].append((index, share))
    seed_b = crypto.combine_shares(shares[SELF_MASK][:t], t)
    mask_secret = crypto.combine_shares(shares[MASK_KEY][:t], t)
    bits = ctx.params.modulus_bits
    y = masked[victim] - prg.expand(seed_b, ctx.vector_length, bits)
    client = r.clients[victim]
    for peer in client.neighbour_ids:
        pair = prg.expand(pairwise_seed(mask_secret, client.advertisements[peer].mask_key, ctx.digest()),
                          ctx.vector_length, bits)
        y = y - pair if pairwise_sign(victim, peer) > 0 else y + pair
    return y, plain[victim]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_views_with_two_colluders_at_n10_are_refused_and_fail_at_the_accepted_t(seed) -> None:
    _, _, roster = _federation()
    old_params = SecAggParams(7, 4)  # the old default for n = 10
    # Positive control (C = 0, t = 4 accepted): the server recovers the exact input.
    y, truth = _split_view_attack(SecAggPolicy(roster=roster, **OLD), old_params, seed)
    assert y is not None
    np.testing.assert_array_equal(y, truth)
    # Default policy of the roster of 40 (C = 2): t = 4 is refused before any key is made.
    with pytest.raises(PolicyViolation, match=(
        r"reconstruction_threshold 4 with num_shares 7 in a cohort of 10; with up to C = 2 colluding "
        r"members \(ceil\(secagg-corrupt-fraction 0.05 x roster of 40\)\).* c = 2 corrupt neighbours.*t >= 5"
    )):
        _split_view_attack(SecAggPolicy(roster=roster), old_params, seed)
    # At the smallest t it accepts (k = 7, t = 5) no split of the honest clients gives the
    # server t shares of both secrets (exhaustive over all 2^7 splits).
    y, _ = _split_view_attack(SecAggPolicy(roster=roster), SecAggParams(7, 5), seed)
    assert y is None


# -- attack 3: sessions -------------------------------------------------------------------
class RosterSession(Session):
    """:class:`Session` over ``cohort``, whose clients hold ``policy`` (its roster may list
    more members than the cohort)."""

    def __init__(self, cohort, secrets, policy, params):
        self.rng = np.random.default_rng(0)
        self.ids = sorted(cohort)
        self.context = RoundContext(7, 1, tuple(self.ids), params, D + 1, b"h" * 32, multi_round=True)
        self.secrets = {i: secrets[i] for i in self.ids}
        self.policy = policy
        self.setups = {i: SecAggClient(i, secrets[i], policy) for i in self.ids}
        self.clients: dict[int, SessionClient] = {}
        server = SecAggServer(self.context)
        u1 = server.receive_advertisements({c: self.setups[c].advertise(self.context) for c in self.ids})
        blob = codec.decode(codec.encode({"roster": pack_roster(u1)}))["roster"]
        server.receive_nonces({c: self.setups[c].receive_roster(unpack_roster(blob)) for c in self.ids})
        self.server = SessionServer(server)


def test_session_re_keyed_into_the_victim_and_two_colluders_is_refused() -> None:
    ids, secrets, roster = _federation()
    victim, colluders = ids[0], ids[1:3]
    params = SecAggParams.for_cohort(3, max_colluders=0)
    with pytest.raises(PolicyViolation, match=r"announced a cohort of 3: with up to C = 2 colluding members"):
        RosterSession([victim, *colluders], secrets, SecAggPolicy(roster=roster), params)
    # Positive control (C = 0): the session's first round gives the victim's exact input.
    s = RosterSession([victim, *colluders], secrets, SecAggPolicy(roster=roster, **OLD), params)
    total, weight, _, plain = s.round(1)
    got = _read_victim(total, weight, plain, colluders, params.modulus_bits)
    np.testing.assert_array_equal(got, plain[victim])


def test_session_round_over_the_victim_and_two_colluders_is_not_signed() -> None:
    ids, secrets, roster = _federation()
    victim, colluders, honest = ids[0], ids[1:3], ids[3:5]
    # A session of 5 (C + 3) passes; a round that asks only the victim and the colluders
    # (the honest members "dropped") is never signed by the victim.
    s = RosterSession([victim, *colluders, *honest], secrets, SecAggPolicy(roster=roster),
                      SecAggParams.for_cohort(5, max_colluders=2))
    s.inputs(1, [victim, *colluders])
    with pytest.raises(PolicyViolation, match=(
        r"a survivor set \(the inputs of the sum\) of 3: with up to C = 2 colluding members"
    )):
        s.clients[victim].consistency(1, [victim, *colluders])
    # Positive control (C = 0): a session of 4, one honest member "dropped" this round.
    old = RosterSession([victim, *colluders, honest[0]], secrets, SecAggPolicy(roster=roster, **OLD),
                        SecAggParams.for_cohort(4, max_colluders=0))
    total, weight, u3, plain = old.round(1, nodes=[victim, *colluders])
    assert u3 == sorted([victim, *colluders])
    got = _read_victim(total, weight, plain, colluders, old.context.params.modulus_bits)
    np.testing.assert_array_equal(got, plain[victim])


# -- honest controls at the new defaults ----------------------------------------------------
@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "consistency", "unmask"])
def test_a_round_of_10_at_c2_survives_a_dropout_at_each_stage_with_the_exact_sum(stage) -> None:
    ids, secrets, roster = _federation()
    cohort = ids[:10]
    params = SecAggParams.for_cohort(10, max_colluders=2)
    assert (params.num_shares, params.reconstruction_threshold) == (9, 6)
    ctx = RoundContext(7, 1, tuple(sorted(cohort)), params, D_ROUND + 1, b"h" * 32)
    rng = np.random.default_rng(3)
    r = Round({i: SecAggClient(i, secrets[i], SecAggPolicy(roster=roster)) for i in cohort}, SecAggServer(ctx),
              {i: rng.normal(0, 0.3, D_ROUND) for i in cohort}, {i: int(rng.integers(1, 100)) for i in cohort})
    gone = cohort[4]
    total, weight, active = run(r, drop={stage: {gone}})
    survivors = [c for c in cohort if c != gone] if stage in ("share-keys", "masked-input") else cohort
    assert sorted(active) == sorted(survivors)
    assert weight == sum(r.weights[c] for c in survivors)
    np.testing.assert_allclose(mean_of(r, total, weight), expected_mean(r, survivors), atol=params.step)


def test_mod_the_node_configs_colluder_bound_binds_the_servers_t(tmp_path, caplog) -> None:
    """secagg-max-colluders = 2 on every node of 5: a server choosing t for its own C
    (ceil(0.05 x 5) = 1) is refused at advertise, the reason in the server's log; with
    max_colluders=2 the round runs and gives the exact mean."""
    fed = ModFederation(5, tmp_path, node_config={"secagg-max-colluders": "2"})
    with caplog.at_level("WARNING", logger="flwr_guard.secagg.strategy"):
        agg, report = run_strategy_round(fed)
    assert agg is None and "aborted at advertise" in report.aborted
    refusals = [r.getMessage() for r in caplog.records if r.name == "flwr_guard.secagg.strategy"
                and "replied with an error" in r.getMessage()]
    assert len(refusals) == 5
    assert all("C = 2 colluding members (secagg-max-colluders=2)" in m and "t >= 4" in m for m in refusals)
    agg, report = run_strategy_round(fed, max_colluders=2)
    assert report.aborted is None and report.survivors == 5
    assert 2 * report.reconstruction_threshold > report.num_shares + 2
    np.testing.assert_allclose(agg, fed.expected_mean(fed.ids), atol=SecAggParams(4, 4).step)


# -- item 4: the session's length ------------------------------------------------------------
def test_a_session_past_its_rounds_or_its_age_asks_for_a_re_key() -> None:
    s = Session(n=6, max_session_rounds=3)
    s.round(1)
    s.round(3)  # rounds 1..3 of a session set up in round 1
    client = s.clients[s.ids[0]]
    with pytest.raises(ProtocolError, match=(
        f"^{re.escape(UNKNOWN_SESSION)}: round 4 would be round 4 of a session set up in round 1, this "
        r"client's policy caps a session at 3 rounds \(secagg-max-session-rounds\); the server must re-key"
    )):
        client.check_input_round(4)
    # The default cap (100 rounds) refuses the 10,000-round jump that was accepted.
    d = Session(n=6)
    d.round(1)
    with pytest.raises(ProtocolError, match="round 10001 would be round 10001 .* caps a session at 100 rounds"):
        d.clients[d.ids[0]].masked_input(10_001, b"m" * 32, np.zeros(D), 1)
    d.round(100)  # the last round the default allows
    # Wall clock: 24 h from the opening by default.
    with pytest.raises(ProtocolError, match=(
        f"^{re.escape(UNKNOWN_SESSION)}: the session was opened 86401 s ago, this client's policy caps a "
        r"session at 86400 s \(secagg-max-session-seconds\); the server must re-key"
    )):
        _aged(86_401)


def _aged(seconds: float) -> None:
    s = Session(n=6)
    client = s.open(s.ids[0])
    client.check_input_round(2, now=client.opened_at + 86_399)  # within the day: accepted
    state = client.to_state()
    restored = SessionClient.from_state(codec.decode(codec.encode(state)), s.secrets[s.ids[0]], s.policy)
    assert restored.opened_at == client.opened_at  # the opening time survives the store
    restored.check_input_round(2, now=client.opened_at + seconds)


def test_a_stored_session_without_its_opening_time_is_treated_as_expired() -> None:
    s = Session(n=6)
    client = s.open(s.ids[0])
    state = client.to_state()
    del state["opened_at"]
    old = SessionClient.from_state(codec.decode(codec.encode(state)), s.secrets[s.ids[0]], s.policy)
    with pytest.raises(ProtocolError, match=f"^{re.escape(UNKNOWN_SESSION)}: the session was opened"):
        old.check_input_round(2)


def test_mod_a_client_cap_below_the_servers_loses_one_round_and_the_next_re_keys(tmp_path) -> None:
    fed = ModFederation(5, tmp_path, node_config={"secagg-max-session-rounds": "2"})
    results = run_strategy_rounds(fed, 4)
    (_, r1), (_, r2), (agg3, r3), (agg4, r4) = results
    assert r1.key_setup and not r2.key_setup and r2.aborted is None
    assert agg3 is None and not r3.key_setup  # every client refused round 3 of the session
    assert r4.key_setup and r4.aborted is None and r4.survivors == 5
    np.testing.assert_allclose(agg4, fed.expected_mean(fed.ids), atol=SecAggParams(4, 3).step)


def test_sampled_cohorts_of_a_large_roster_need_t_for_all_c() -> None:
    """docs/secagg.md, "Sampled cohorts pay for the absolute bound"."""
    for roster, n, old, new in ((200, 20, (14, 8, 1), (19, 15, 10)), (1000, 100, (64, 35, 5), (99, 75, 50))):
        c = colluders_for(roster)
        got = choose_parameters(n, colluders=c)
        assert (got.num_shares, got.reconstruction_threshold, got.corrupt_neighbours) == new
        assert got.correctness_failure == 1.0
        was = choose_parameters(n, colluders=n // 20)  # the old rule: floor(0.05 n) of the cohort
        assert (was.num_shares, was.reconstruction_threshold, was.corrupt_neighbours) == old
        assert SecAggParams.for_cohort(n, federation_size=roster).reconstruction_threshold == new[1]
    policy = SecAggPolicy(roster=_federation(1000)[2])
    assert policy.min_sum == 53
    with pytest.raises(PolicyViolation, match="announced a cohort of 50: with up to C = 50 colluding members"):
        policy.check_context(RoundContext(1, 1, tuple(range(50)), SecAggParams(35, 19), 5, b"h" * 32))
    for n, k, t in ((10, 8, 5), (20, 14, 8), (100, 64, 35)):  # a cohort of the whole roster
        p = SecAggParams.for_cohort(n)
        assert (p.num_shares, p.reconstruction_threshold) == (k, t)


def test_per_round_no_masked_input_when_the_clients_that_shared_keys_are_too_few() -> None:
    """The server routes only the victim's and the colluders' shares (U2 of 3 in a cohort
    of 5): every sum within U2 is below C + 3, so the victim sends no masked input."""
    ids, secrets, roster = _federation()
    victim, colluders, honest = ids[0], ids[1:3], ids[3:5]
    cohort = [victim, *colluders, *honest]
    ctx = RoundContext(7, 1, tuple(sorted(cohort)), SecAggParams.for_cohort(5, max_colluders=2), D_ROUND + 1, b"h" * 32)
    clients = {i: SecAggClient(i, secrets[i], SecAggPolicy(roster=roster)) for i in cohort}
    r = Round(clients, SecAggServer(ctx), {i: np.zeros(D_ROUND) for i in cohort}, {i: 1 for i in cohort})
    routed = setup(r)
    u2 = [victim, *colluders]
    with pytest.raises(PolicyViolation, match=(
        r"clients that shared keys: a largest possible sum of 3: with up to C = 2 colluding members"
    )):
        clients[victim].masked_input(u2, {c: routed[victim][c] for c in colluders}, np.zeros(D_ROUND), 1,
                                     ctx.model_hash)
    # With all five in U2 the same client masks its input (the control).
    vector, bad, _ = clients[victim].masked_input(sorted(cohort), routed[victim], np.zeros(D_ROUND), 1,
                                                  ctx.model_hash)
    assert bad == [] and vector.shape == (D_ROUND + 1,)


class _WithoutSparseSplitCheck(SecAggPolicy):
    """The policy before the sparse-split check (the positive control's victim)."""

    def check_sparse_split(self, n, k, t, degree, c):
        return None


def _split_survivor_attack(policy_cls):
    """A server with a sparse graph (cohort 12, k = 3, t = 2) drops the honest neighbours
    D of a small set S after their masked inputs and unmasks S's sum alone, while the
    signed U3 stays above the sum floor. Nodes promise h = 4 honest others (C = 0).
    Returns (|S|, whether the server read S's exact sum)."""
    from secagg_harness import Round, setup

    from flwr_guard.secagg.client import encode_input
    from flwr_guard.secagg.messages import MASK_KEY, SELF_MASK
    from flwr_guard.secagg.transcripts import commit_self_mask, pairwise_sign

    n, k, t, d = 12, 3, 2, 20
    ids, secrets, roster = _federation(40)
    policy = policy_cls(roster=roster, max_colluders=0, min_honest_others=4)
    cohort = ids[:n]
    params = SecAggParams(num_shares=k, reconstruction_threshold=t)
    ctx = RoundContext(7, 1, tuple(sorted(cohort)), params, d + 1, b"h" * 32)
    clients = {i: SecAggClient(i, secrets[i], policy) for i in cohort}
    rng = np.random.default_rng(1)
    updates = {i: rng.normal(0, 0.3, d) for i in cohort}
    weights = {i: int(rng.integers(1, 100)) for i in cohort}
    r = Round(clients, SecAggServer(ctx), updates, weights)
    routed = setup(r)
    graph = r.server.graph
    split = None
    for size in (2, 3, 4):
        for members in itertools.combinations(cohort, size):
            s = set(members)
            if not all(len(set(graph[u]) & s) >= t for u in s):
                continue
            dropped = {w for u in s for w in graph[u]} - s
            if all(len(set(graph[x]) - dropped) >= t for x in dropped) and n - len(dropped) >= policy.min_sum:
                split = (s, dropped)
                break
        if split:
            break
    assert split is not None
    s, dropped = split
    plain, replies = {}, {}
    for c in cohort:
        vec, bad, _ = clients[c].masked_input(list(routed), routed[c], updates[c], weights[c],
                                              ctx.model_hash, rng=np.random.default_rng(c))
        plain[c], _ = encode_input(ctx, updates[c], weights[c], rng=np.random.default_rng(c))
        if c not in dropped:
            replies[c] = (vec, bad)
    u3 = r.server.receive_masked_inputs(replies)
    active, lost, _ = r.server.receive_signatures({c: clients[c].consistency(u3) for c in u3})
    r.server.receive_unmask({c: clients[c].unmask(active, lost, r.server.unmask_signatures(c))
                             for c in active})
    bits, length = params.modulus_bits, ctx.vector_length
    acc = np.zeros(length, dtype=prg.mask_dtype(bits))
    for u in s:
        acc += replies[u][0]
        adv = r.server.advertisements[u]
        b = r.server._reconstruct(u, SELF_MASK, lambda x, c=adv.self_mask_commitment: commit_self_mask(x) == c)
        acc -= prg.expand(b, length, bits)
    for x in dropped:
        key = r.server.advertisements[x].mask_key
        sk = r.server._reconstruct(x, MASK_KEY, lambda y, p=key: crypto.x25519_public(y) == p)
        for u in set(graph[x]) & s:
            m = prg.expand(pairwise_seed(sk, r.server.advertisements[u].mask_key, r.server._digest), length, bits)
            acc = acc - m if pairwise_sign(u, x) > 0 else acc + m
    return len(s), bool(np.array_equal(acc, sum(plain[u] for u in s).astype(acc.dtype)))


def test_a_sparse_graph_whose_t_allows_a_split_below_h_honest_others_is_refused():
    # Positive control: without the check the server reads the sum of 4 honest inputs
    # although each node promised h = 4 honest others (sums of at least 5).
    size, exact = _split_survivor_attack(_WithoutSparseSplitCheck)
    assert exact and size <= 4
    with pytest.raises(PolicyViolation, match=r"t - c \+ 1 = 3 honest inputs, and this client needs h = 4"):
        _split_survivor_attack(SecAggPolicy)


def test_an_open_session_ends_when_the_roster_drops_a_member_or_c_rises():
    from flwr_guard.secagg.errors import ProtocolError

    s = Session(n=10, seed=3)
    s.round(2)
    member = s.ids[0]
    client = s.clients[s.ids[1]]
    client.check_policy({})  # control: the policy the session was set up under accepts it
    revoked = Roster(tuple(x for x in s.policy.roster.members
                           if x.signing_key != crypto.ed25519_public(s.secrets[member])))
    reloaded = SessionClient.from_state(client.to_state(), s.secrets[s.ids[1]], SecAggPolicy(roster=revoked))
    with pytest.raises(ProtocolError, match=rf"^{re.escape(UNKNOWN_SESSION)}: .*node {member} signs with a key that "
                                            "is not on the federation roster"):
        reloaded.check_policy({})
    # C raised by node config (0 -> 3): the set-up's t no longer meets 2t > k + c.
    stricter = SecAggPolicy(roster=s.policy.roster, max_colluders=3)
    reloaded = SessionClient.from_state(client.to_state(), s.secrets[s.ids[1]], stricter)
    with pytest.raises(ProtocolError, match=rf"^{re.escape(UNKNOWN_SESSION)}: .*C = 3 colluding members"):
        reloaded.check_policy({})
