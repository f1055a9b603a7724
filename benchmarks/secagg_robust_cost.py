"""Round cost of the issue-20 changes (bounded decoding, plausibility checks, pair-seed
commitments, set-up retries when nobody is lost): wall time of SecAgg+ rounds with the
real strategy and mods in one process (``tests/secagg_harness.py``; no network, no
training; every client's work and the server's on one machine), now and at a baseline
commit, each in its own subprocess, alternating, in the same run. Per-round protocol: 2
rounds; sessions: the set-up and 4 rounds; reported per round (median over repeats)
and the ratio now/before.

Usage: python benchmarks/secagg_robust_cost.py [--sizes 20 100] [--d 10000] [--repeats 3]
Writes benchmarks/results/secagg_robust_cost.json.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def _child(n: int, d: int, multi_round: bool, rounds: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    logging.disable(logging.CRITICAL)
    from secagg_harness import ModFederation, run_strategy_rounds

    fed = ModFederation(n, Path(tempfile.mkdtemp(prefix="cost-")), d=d, seed=1)
    started = time.perf_counter()
    results = run_strategy_rounds(fed, rounds, multi_round=multi_round)
    seconds = time.perf_counter() - started
    assert all(agg is not None for agg, _ in results), [r.aborted for _, r in results]
    print(json.dumps([seconds / rounds]))


def _run(src: str, n: int, d: int, multi_round: bool, rounds: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(d), str(int(multi_round)),
                          str(rounds)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--d", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default="a71cc33")
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        n, d, multi, rounds = map(int, args.child)
        _child(n, d, bool(multi), rounds)
        return
    archive = subprocess.run(["git", "archive", args.baseline, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=BytesIO(archive)).extractall(tmp)
        sources = {"before": str(Path(tmp) / "src"), "now": str(ROOT / "src")}
        for n in args.sizes:
            for multi_round in (False, True):
                # Sessions: the set-up and 4 rounds, per round; per round: 2 rounds.
                rounds = 4 if multi_round else 2
                times: dict[str, list[float]] = {"before": [], "now": []}
                for _ in range(args.repeats):
                    for label, src in sources.items():
                        times[label].append(_run(src, n, args.d, multi_round, rounds)[-1])
                med = {k: statistics.median(v) for k, v in times.items()}
                key = f"n={n} {'session round' if multi_round else 'per-round round'}"
                results[key] = {"before_s": round(med["before"], 3), "now_s": round(med["now"], 3),
                                "ratio": round(med["now"] / med["before"], 3), "samples": times}
                print(f"{key:28s} before {med['before']:.3f} s  now {med['now']:.3f} s  "
                      f"ratio {med['now'] / med['before']:.3f}")
    path = ROOT / "benchmarks" / "results" / "secagg_robust_cost.json"
    path.write_text(json.dumps({"d": args.d, "baseline": args.baseline, "rounds": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
