"""Drive the SecAgg+ core state machines in-process (no Flower), with dropouts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from guard_harness import LoopbackGrid

from flwr_guard.secagg import codec, crypto
from flwr_guard.secagg.client import SecAggClient
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.messages import (
    pack_advertisements,
    pack_nonces,
    pack_roster,
    unpack_advertisements,
    unpack_nonces,
    unpack_roster,
)
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.policy import Roster, RosterMember, SecAggPolicy
from flwr_guard.secagg.quantization import dequantize_mean
from flwr_guard.secagg.server import SecAggServer


@dataclass
class Round:
    clients: dict[int, SecAggClient]
    server: SecAggServer
    updates: dict[int, np.ndarray]
    weights: dict[int, int]
    masked: dict[int, np.ndarray] = field(default_factory=dict)


UNIFORM_P_FLOOR = 1e-6
"""p-value floor of the uniformity checks of masked vectors. The masks come from fresh
keys each run, so those checks are random: at 1e-6 per check the suite fails by chance
about once in 10^5 runs (10 checks per run), while a real bias at d >= 1000 gives
p-values far below it (test_server_view_masked_vectors_are_uniform_and_uncorrelated
has the positive controls)."""


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


# -- the real Flower adapters in one process -----------------------------------------
# An in-process Grid: the real SecAggPlus strategy pushes real Flower Messages, each is
# handed to the real secaggplus_mod of its destination node (with that node's own
# Context: node config with a key file and the federation roster), and the reply comes
# back through pull_messages. A deviating server is a ``tamper`` hook that rewrites
# the instructions of one stage before they are delivered.


FEDERATION_RUN_ID = 1  # the run the tests' own RoundContexts name


class ModFederation(LoopbackGrid):
    """``n`` SuperNodes running ``secaggplus_mod`` around a train function that adds a
    known update (node j: ``0.01 * (j + 1)`` on every value), over a signed roster.

    The one in-process grid of the tests (:class:`guard_harness.LoopbackGrid`: messages
    stamped and copied through Flower's wire format both ways), with each node's reply
    coming from its real ``secaggplus_mod`` instead of a whole ClientApp, and a
    ``tamper(stage, node, instruction)`` hook for a deviating server."""

    def __init__(self, n: int, tmp_path, d: int = 50, roster: bool = True, admin: bool = True,
                 node_config: dict | None = None, seed: int = 0) -> None:
        from flwr.app import Context, RecordDict

        from flwr_guard.secagg.keys import write_signing_key
        from flwr_guard.secagg.policy import Roster, RosterMember

        rng = np.random.default_rng(seed)
        self.ids = sorted({int(i) for i in rng.integers(1, 2**62, size=n)})
        self.d = d
        self.updates = {i: np.full(d, 0.01 * (j + 1), dtype=np.float32) for j, i in enumerate(self.ids)}
        self.weights = {i: 10 * (j + 1) for j, i in enumerate(self.ids)}
        self.admin_secret, self.admin_public = crypto.ed25519_keypair()
        members, contexts = [], {}
        for j, i in enumerate(self.ids):
            key_file = tmp_path / f"node{j}.key"
            members.append(RosterMember(write_signing_key(key_file), f"node{j}"))
            config = {"secagg-signing-key": str(key_file), **(node_config or {})}
            contexts[i] = Context(run_id=FEDERATION_RUN_ID, node_id=i, node_config=config,
                                  state=RecordDict(), run_config={})
        self.roster_path = tmp_path / "roster.json"
        Roster(tuple(members)).to_file(self.roster_path, self.admin_secret if admin else None)
        if roster:
            for c in contexts.values():
                c.node_config["secagg-roster"] = str(self.roster_path)
                if admin:
                    c.node_config["secagg-roster-admin-key"] = self.admin_public.hex()
        super().__init__(dict.fromkeys(self.ids), contexts=contexts, run_id=FEDERATION_RUN_ID)
        self.seen: dict[int, list[str]] = {}  # node -> names of the ArrayRecords train saw
        self.trained_on: dict[int, dict[str, np.ndarray]] = {}
        self.tamper = None  # (stage, node, Message) -> Message | None

    def _train(self, msg, context):
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        node = context.node_id
        self.seen[node] = list(msg.content.array_records)
        record = next(iter(msg.content.array_records.values()))
        arrays = {k: v.numpy() for k, v in record.items()}
        self.trained_on[node] = arrays
        local = {k: v + self.updates[node][: v.size].reshape(v.shape) for k, v in arrays.items()}
        return Message(RecordDict({
            "arrays": ArrayRecord(numpy_ndarrays=list(local.values())),
            "metrics": MetricRecord({"num-examples": self.weights[node], "train-loss": 0.5}),
        }), reply_to=msg)

    def answer(self, node, incoming):
        """The instruction, after ``tamper``, into the node's real mod (as a SuperNode would)."""
        from flwr_guard.secagg.constants import SECAGG_RECORD
        from flwr_guard.secagg.mod import secaggplus_mod

        if self.tamper is not None:
            stage = str(incoming.content.config_records[SECAGG_RECORD]["stage"])
            incoming = self.tamper(stage, node, incoming)
            if incoming is None:
                return None
        return secaggplus_mod(incoming, self.contexts[node], self._train)

    def global_arrays(self):
        from flwr.app import ArrayRecord

        return ArrayRecord(numpy_ndarrays=[np.zeros(self.d, dtype=np.float32)])

    def expected_mean(self, survivors) -> np.ndarray:
        w = np.array([self.weights[c] for c in survivors], dtype=float)
        x = np.stack([self.updates[c] for c in survivors]).astype(float)
        return (w[:, None] * x).sum(0) / w.sum()


def run_strategy_round(fed: ModFederation, **kwargs):
    """One real SecAggPlus(FedAvg) round over ``fed``; returns (aggregate or None, report)."""
    ((agg, report),) = run_strategy_rounds(fed, 1, **kwargs)
    return agg, report


def run_strategy_rounds(fed: ModFederation, rounds: int, tampers: dict | None = None, **kwargs):
    """``rounds`` rounds of one real SecAggPlus(FedAvg) over ``fed`` (each from the zero
    model); ``tampers[r]`` replaces ``fed.tamper`` in round r. Returns [(aggregate or
    None, report)] and records the messages pushed per round in ``fed.per_round``."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_guard.secagg.strategy import SecAggPlus

    strategy = SecAggPlus(FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2),
                          timeout=0.2, **kwargs)  # replies are synchronous here
    arrays = fed.global_arrays()
    # What Flower's ServerApp runtime sets before a strategy creates Messages.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, FEDERATION_RUN_ID, 0
    out, fed.per_round = [], {}
    base = fed.tamper
    try:
        for r in range(1, rounds + 1):
            fed.tamper = (tampers or {}).get(r, base)
            start = len(fed.pushed)
            messages = strategy.configure_train(r, arrays, ConfigRecord({"lr": 0.1}), fed)
            replies = [rep for rep in (fed.deliver(m) for m in messages) if rep is not None]
            fed.pushed.extend(messages)
            result, _ = strategy.aggregate_train(r, replies)
            fed.per_round[r] = fed.pushed[start:]
            agg = None if result is None else next(iter(result.values())).numpy()
            out.append((agg, strategy.history[-1]))
    finally:
        TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None
        fed.tamper = base
    return out
