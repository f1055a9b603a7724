"""Honest-round cost of the signed statements behind the ``unmask-recover`` stage
(docs/secagg.md, "Recovery from a wrong pair seed"): CPU seconds (``time.process_time``)
per client per session round (input, consistency, unmask: the clients' own work) and
the server's per round, now and at a baseline commit, each in its own subprocess,
alternating, in the same run. Core state machines only (tests/test_secagg_session.py's
``Session`` harness: no Flower, no network, no training), so the numbers isolate the
protocol's work; the Ed25519 sign and verify costs are measured on their own as well.

Usage: python benchmarks/secagg_recover_cost.py [--n 20] [--d 10000 100000] [--rounds 4]
       [--repeats 3] [--baseline ca1dd03]
Writes benchmarks/results/secagg_recover_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(n: int, d: int, rounds: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    import test_secagg_session as harness

    harness.D = d  # the harness's vector length (module global)
    s = harness.Session(n=n)
    client = server = 0.0
    for r in range(1, rounds + 2):
        s.server.start_round(r, b"m" * 32, s.ids)
        replies = {}
        for c in s.ids:
            cl = s.clients.get(c) or s.open(c)
            update = np.random.default_rng(c + r).normal(0, 0.3, d)
            t0 = time.process_time()
            replies[c] = cl.masked_input(r, b"m" * 32, update, 10)
            if r > 1:
                client += time.process_time() - t0
        t0 = time.process_time()
        u3 = s.server.receive_masked_inputs(replies)
        srv = time.process_time() - t0
        sigs = {}
        for c in u3:
            t0 = time.process_time()
            sigs[c] = s.clients[c].consistency(r, u3)
            client += (time.process_time() - t0) if r > 1 else 0
        t0 = time.process_time()
        s.server.receive_signatures(sigs)
        requests = {c: s.server.unmask_request(c) for c in u3}
        srv += time.process_time() - t0
        reveals = {}
        for c in u3:
            t0 = time.process_time()
            reveals[c] = s.clients[c].unmask(r, u3, *requests[c])
            client += (time.process_time() - t0) if r > 1 else 0
        t0 = time.process_time()
        s.server.receive_unmask(reveals)
        s.server.aggregate()
        srv += time.process_time() - t0
        server += srv if r > 1 else 0  # round 1 opens the sessions: not counted
    print(json.dumps({"client_s_per_round": client / (n * rounds), "server_s_per_round": server / rounds}))


def _run(src: Path, n: int, d: int, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(d), str(rounds)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ed25519() -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from flwr_guard.secagg import crypto

    secret, public = crypto.ed25519_keypair()
    message = bytes(32)
    signature = crypto.sign(secret, message)
    t0 = time.process_time()
    for _ in range(2000):
        crypto.sign(secret, message)
    t1 = time.process_time()
    for _ in range(2000):
        crypto.verify(public, message, signature)
    t2 = time.process_time()
    return {"sign_us": (t1 - t0) / 2000 * 1e6, "verify_us": (t2 - t1) / 2000 * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--d", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default="ca1dd03")
    parser.add_argument("--child", nargs=3, type=int)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    archive = subprocess.run(["git", "archive", args.baseline, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    out: dict = {"n": args.n, "rounds": args.rounds, "repeats": args.repeats,
                 "baseline": args.baseline, "ed25519": _ed25519(), "cells": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=BytesIO(archive)).extractall(tmp)
        before_src, now_src = Path(tmp) / "src", ROOT / "src"
        for d in args.d:
            runs: dict[str, list[dict]] = {"now": [], "before": []}
            for _ in range(args.repeats):
                runs["before"].append(_run(before_src, args.n, d, args.rounds))
                runs["now"].append(_run(now_src, args.n, d, args.rounds))
            cell = {}
            for key in ("client_s_per_round", "server_s_per_round"):
                now = statistics.median(r[key] for r in runs["now"])
                before = statistics.median(r[key] for r in runs["before"])
                cell[key] = {"now": now, "before": before, "ratio": now / before}
            out["cells"][str(d)] = cell
            print(f"n = {args.n}, d = {d}: client {cell['client_s_per_round']['now'] * 1e3:.2f} ms "
                  f"(before {cell['client_s_per_round']['before'] * 1e3:.2f} ms, "
                  f"x{cell['client_s_per_round']['ratio']:.3f}); server "
                  f"{cell['server_s_per_round']['now'] * 1e3:.1f} ms (before "
                  f"{cell['server_s_per_round']['before'] * 1e3:.1f} ms, "
                  f"x{cell['server_s_per_round']['ratio']:.3f}) per round")
    print(f"Ed25519 (cryptography): sign {out['ed25519']['sign_us']:.1f} us, "
          f"verify {out['ed25519']['verify_us']:.1f} us")
    path = ROOT / "benchmarks" / "results" / "secagg_recover_cost.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
