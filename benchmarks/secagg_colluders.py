"""The client's cost of the absolute colluder bound (issue 20, item 1).

The bound changes no message and no primitive: it changes (k, t) where a cohort can
hold more colluders than the old rule (gamma x cohort) assumed, and adds O(1) checks.
This measures, in one run and on one machine, the CPU time of one multi-round session
round of the core (no Flower: every client's input, consistency and unmask, and the
server's), and of one per-round key set-up per client (advertise, roster, share-keys),
with the old rule's (k, t) and with the new one's, for:

- n = 20 and 100, every roster member in every round (roster = cohort): the defaults;
- n = 20 of a roster of 200 and n = 100 of a roster of 1000 (C = 10, 50 in the cohort).

Ratios new / old are of the same code in the same run. The added policy checks are
timed apart (cold: a fresh ClientApp process per message has an empty cache).

Usage: python benchmarks/secagg_colluders.py [--dimension 100000] [--rounds 3]
Writes benchmarks/results/secagg_colluders.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from flwr_guard.secagg import crypto
from flwr_guard.secagg.client import SecAggClient
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.params import SecAggParams, choose_parameters, colluders_for, tolerated_corrupt_neighbours
from flwr_guard.secagg.policy import Roster, RosterMember, SecAggPolicy
from flwr_guard.secagg.server import SecAggServer
from flwr_guard.secagg.session_client import SessionClient
from flwr_guard.secagg.session_server import SessionServer

REPO = Path(__file__).resolve().parents[1]
CASES = ((20, 20), (100, 100), (20, 200), (100, 1000))


def _params(n: int, colluders: int) -> SecAggParams:
    ch = choose_parameters(n, colluders=colluders)
    return SecAggParams(ch.num_shares, ch.reconstruction_threshold)


def _one(n: int, roster_size: int, params: SecAggParams, dimension: int, rounds: int) -> dict:
    ids = list(range(1, n + 1))
    secrets = {i: crypto.ed25519_keypair()[0] for i in ids}
    extra = [crypto.ed25519_keypair()[1] for _ in range(roster_size - n)]
    roster = Roster(tuple(RosterMember(crypto.ed25519_public(s), f"m{i}") for i, s in secrets.items())
                    + tuple(RosterMember(k, f"x{j}") for j, k in enumerate(extra)))
    policy = SecAggPolicy(roster=roster, max_colluders=0)  # accept both (k, t) under test
    context = RoundContext(7, 1, tuple(ids), params, dimension + 1, b"h" * 32, multi_round=True)
    setups = {i: SecAggClient(i, secrets[i], policy) for i in ids}
    server = SecAggServer(context)
    setup_cpu = 0.0
    started = time.process_time()
    ads = {i: setups[i].advertise(context) for i in ids}
    setup_cpu += time.process_time() - started
    u1 = server.receive_advertisements(ads)
    started = time.process_time()
    nonces = {i: setups[i].receive_roster(u1) for i in ids}
    setup_cpu += time.process_time() - started
    server.receive_nonces(nonces)
    session = SessionServer(server)
    started = time.process_time()
    clients = {i: SessionClient.open(setups[i], session.open_payload(i)["advertisements"],
                                     session.open_payload(i)["nonces"]) for i in ids}
    setup_cpu += time.process_time() - started
    rng = np.random.default_rng(0)
    updates = {i: rng.normal(0, 0.3, dimension) for i in ids}
    client_cpu, server_cpu = [], []
    for r in range(1, rounds + 1):
        session.start_round(r, b"m" * 32, ids)
        c0 = time.process_time()
        replies = {i: clients[i].masked_input(r, b"m" * 32, updates[i], 10) for i in ids}
        c1 = time.process_time()
        u3 = session.receive_masked_inputs(replies)
        c2 = time.process_time()
        sigs = {i: clients[i].consistency(r, u3) for i in u3}
        c3 = time.process_time()
        session.receive_signatures(sigs)
        c4 = time.process_time()
        reveals = {}
        for i in u3:
            signatures, cts = session.unmask_request(i)
            reveals[i] = clients[i].unmask(r, u3, signatures, cts)
        c5 = time.process_time()
        session.receive_unmask(reveals)
        session.aggregate()
        c6 = time.process_time()
        client_cpu.append((c1 - c0 + c3 - c2 + c5 - c4) / n)
        server_cpu.append(c2 - c1 + c4 - c3 + c6 - c5)
    return {"k": params.num_shares, "t": params.reconstruction_threshold,
            "client_cpu_s_per_round": float(np.median(client_cpu)),
            "server_cpu_s_per_round": float(np.median(server_cpu)),
            "client_setup_cpu_s": setup_cpu / n}


def _policy_check_cost(n: int, roster_size: int, params: SecAggParams, repeats: int = 5) -> float:
    """Cold time of the client's policy check of a round context (the hypergeometric
    tail for C in the cohort), in seconds."""
    members = tuple(RosterMember(crypto.ed25519_keypair()[1], f"m{i}") for i in range(roster_size))
    policy = SecAggPolicy(roster=Roster(members))  # C = ceil(0.05 x roster)
    context = RoundContext(7, 1, tuple(range(n)), params, 11, b"h" * 32)
    times = []
    for _ in range(repeats):
        tolerated_corrupt_neighbours.cache_clear()
        started = time.perf_counter()
        policy.check_context(context)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimension", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "secagg_colluders.json")
    args = parser.parse_args()
    rows = []
    for n, roster_size in CASES:
        c_old, c_new = math.floor(0.05 * n), colluders_for(roster_size)
        old = _one(n, roster_size, _params(n, c_old), args.dimension, args.rounds)
        new = _one(n, roster_size, _params(n, c_new), args.dimension, args.rounds)
        row = {"n": n, "roster": roster_size, "C_old_rule": c_old, "C": c_new, "old": old, "new": new,
               "client_round_ratio": new["client_cpu_s_per_round"] / old["client_cpu_s_per_round"],
               "client_setup_ratio": new["client_setup_cpu_s"] / old["client_setup_cpu_s"],
               "policy_check_s": _policy_check_cost(n, roster_size, _params(n, c_new))}
        rows.append(row)
        print(f"n={n} roster={roster_size}: k,t {old['k']},{old['t']} -> {new['k']},{new['t']}; "
              f"client CPU per round {old['client_cpu_s_per_round']*1e3:.1f} -> "
              f"{new['client_cpu_s_per_round']*1e3:.1f} ms (x{row['client_round_ratio']:.2f}); "
              f"set-up {old['client_setup_cpu_s']*1e3:.1f} -> {new['client_setup_cpu_s']*1e3:.1f} ms "
              f"(x{row['client_setup_ratio']:.2f}); policy check {row['policy_check_s']*1e3:.2f} ms")
    args.out.write_text(json.dumps({"dimension": args.dimension, "rounds": args.rounds, "rows": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
