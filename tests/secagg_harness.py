"""Drive the SecAgg+ core state machines in-process (no Flower), with dropouts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flwr_guard.secagg import codec, crypto
from flwr_guard.secagg.client import (
    SecAggClient,
    pack_advertisements,
    pack_nonces,
    pack_roster,
    unpack_advertisements,
    unpack_nonces,
    unpack_roster,
)
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.policy import Roster, RosterMember, SecAggPolicy
from flwr_guard.secagg.quantization import dequantize_mean
from flwr_guard.secagg.server import SecAggServer

STAGES = ("advertise", "roster", "share-keys", "masked-input", "consistency", "unmask")


@dataclass
class Round:
    clients: dict[int, SecAggClient]
    server: SecAggServer
    updates: dict[int, np.ndarray]
    weights: dict[int, int]
    masked: dict[int, np.ndarray] = field(default_factory=dict)


def make_round(n: int, d: int, seed: int = 0, params: SecAggParams | None = None, **kw) -> Round:
    rng = np.random.default_rng(seed)
    ids = sorted({int(i) for i in rng.integers(1, 2**63 - 1, size=n)})
    params = params or SecAggParams.for_cohort(n, **kw)
    context = RoundContext(7, 1, tuple(sorted(ids)), params, d + 1, b"h" * 32)
    secrets = {i: crypto.ed25519_keypair()[0] for i in ids}
    policy = federation_policy(secrets.values())
    clients = {i: SecAggClient(i, secrets[i], policy) for i in ids}
    updates = {i: rng.normal(0, 0.3, size=d) for i in ids}
    weights = {i: int(rng.integers(1, 200)) for i in ids}
    return Round(clients, SecAggServer(context), updates, weights)


def federation_policy(signing_secrets, **kw) -> SecAggPolicy:
    """A policy whose federation roster lists the public keys of ``signing_secrets``."""
    members = tuple(RosterMember(crypto.ed25519_public(s), f"m{j}") for j, s in enumerate(signing_secrets))
    return SecAggPolicy(roster=Roster(members), **kw)


def share_keys_payload(server: SecAggServer, node: int) -> bytes:
    """The share-keys payload the strategy sends ``node`` (codec-encoded, as on the wire
    inside the ``secagg`` ConfigRecord): every revealed nonce + its neighbours' advertisements."""
    return codec.encode({
        "nonces": pack_nonces(server.nonces),
        "advertisements": pack_advertisements(server.neighbour_advertisements(node)),
    })


def roster_stage(r: Round, nodes) -> dict[int, bytes]:
    """Each of ``nodes`` checks the roster the strategy sends (on the wire) and reveals."""
    blob = codec.decode(codec.encode({"roster": pack_roster(r.server.roster())}))["roster"]
    return {c: r.clients[c].receive_roster(unpack_roster(blob)) for c in nodes}


def share_keys(r: Round, node: int) -> dict[int, bytes]:
    """``node``'s share-keys stage on the payload the strategy would send it."""
    payload = codec.decode(share_keys_payload(r.server, node))
    return r.clients[node].share_keys(
        unpack_advertisements(payload["advertisements"]), unpack_nonces(payload["nonces"])
    )


def setup(r: Round, nodes=None) -> dict[int, dict[int, bytes]]:
    """Advertise, roster, share-keys for ``nodes`` (default: all); returns the routed shares."""
    ctx = r.server.context
    nodes = list(ctx.cohort) if nodes is None else nodes
    u1 = r.server.receive_advertisements({c: r.clients[c].advertise(ctx) for c in nodes})
    r.server.receive_nonces(roster_stage(r, [e.node_id for e in u1]))
    return r.server.receive_shares({c: share_keys(r, c) for c in r.server.stats.advertised})


def run(r: Round, drop: dict[str, set[int]] | None = None, model_hashes: dict[int, bytes] | None = None):
    """Run all five stages; ``drop[stage]`` are clients that vanish before replying."""
    drop = drop or {}
    gone: set[int] = set()

    def alive(stage: str, candidates) -> list[int]:
        gone.update(drop.get(stage, set()))
        return [c for c in candidates if c not in gone]

    ctx = r.server.context
    ads = {c: r.clients[c].advertise(ctx) for c in alive("advertise", ctx.cohort)}
    u1 = r.server.receive_advertisements(ads)
    r.server.receive_nonces(roster_stage(r, alive("roster", [e.node_id for e in u1])))
    shares = {c: share_keys(r, c) for c in alive("share-keys", [e.node_id for e in u1])}
    for c in shares:  # the graph the clients derived is the server's
        assert r.clients[c].neighbour_ids == r.server.graph[c]
    routed = r.server.receive_shares(shares)
    replies = {}
    for c in alive("masked-input", routed):
        vector, bad, _ = r.clients[c].masked_input(
            list(routed), routed[c], r.updates[c], r.weights[c],
            (model_hashes or {}).get(c, ctx.model_hash),
        )
        r.masked[c] = vector
        replies[c] = (vector, bad)
    u3 = r.server.receive_masked_inputs(replies)
    signatures = {c: r.clients[c].consistency(u3) for c in alive("consistency", u3)}
    active, dropped, sigs = r.server.receive_signatures(signatures)
    # Each client gets only its neighbours' signatures (and its own), as in the strategy.
    reveals = {
        c: r.clients[c].unmask(active, dropped, r.server.unmask_signatures(c))
        for c in alive("unmask", sigs)
    }
    r.server.receive_unmask(reveals)
    total, weight = r.server.aggregate()
    return total, weight, active


def expected_mean(r: Round, survivors: list[int]) -> np.ndarray:
    p = r.server.context.params
    w = np.array([r.weights[c] for c in survivors], dtype=float)
    x = np.stack([np.clip(r.updates[c], -p.clipping_range, p.clipping_range) for c in survivors])
    return (w[:, None] * x).sum(0) / w.sum()


def mean_of(r: Round, total: np.ndarray, weight: int) -> np.ndarray:
    p = r.server.context.params
    return dequantize_mean(total, weight, p.clipping_range, p.quantization_range)
