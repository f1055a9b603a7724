"""Wall time per round and peak memory of the local deployment for N SuperNodes.

Runs ``flwr-guard demo`` (the digits app on a real SuperLink + N SuperNodes on
127.0.0.1) for each N and samples, every 0.5 s, the memory of every process the
demo started (SuperLink, SuperExecs, SuperNodes, ServerApp, ClientApps). Memory is
PSS (proportional set size: shared pages split between the processes that share
them), so the sum over processes does not count shared libraries N times.

Usage: python benchmarks/demo.py [--nodes 2 4 8] [--rounds 3] [--out PATH]
Prints a table and writes JSON (default benchmarks/results/demo.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from flwr_guard.demo import DemoOptions, run_demo
from flwr_guard.deployment.processes import deployment_pss_bytes


class _PeakSampler(threading.Thread):
    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak, self._stop_event = period_s, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, deployment_pss_bytes())
            self._stop_event.wait(self.period_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def measure(nodes: int, rounds: int) -> dict:
    sampler = _PeakSampler()
    sampler.start()
    started = time.monotonic()
    result = run_demo(DemoOptions(nodes=nodes, rounds=rounds))
    wall = time.monotonic() - started
    peak = sampler.stop()
    if not result.success:
        raise SystemExit(f"demo with {nodes} nodes failed: {result.error}")
    elapsed = [r["elapsed-s"] for r in result.rounds]  # round 0 = initial evaluation
    per_round = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {
        "nodes": nodes,
        "rounds": rounds,
        "round_s": per_round,
        "first_round_s": per_round[0],
        "later_rounds_mean_s": statistics.mean(per_round[1:]) if len(per_round) > 1 else None,
        "demo_wall_s": round(wall, 1),
        "peak_memory_bytes": peak,
        "final_test_accuracy": result.final_test_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo.json"))
    args = parser.parse_args()
    rows = [measure(n, args.rounds) for n in args.nodes]
    table = Table(title=f"flwr-guard demo: local deployment, {args.rounds} rounds")
    for column in ("SuperNodes", "round 1 (s)", "later rounds (s)", "demo wall (s)",
                   "peak memory (GiB)", "memory / node (GiB)", "final accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        later = row["later_rounds_mean_s"]
        table.add_row(
            str(row["nodes"]),
            f"{row['first_round_s']:.1f}",
            "-" if later is None else f"{later:.1f}",
            f"{row['demo_wall_s']:.0f}",
            f"{row['peak_memory_bytes'] / 2**30:.2f}",
            f"{row['peak_memory_bytes'] / 2**30 / row['nodes']:.2f}",
            f"{row['final_test_accuracy']:.3f}",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
               "python": platform.python_version(), "platform": platform.platform()}
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
