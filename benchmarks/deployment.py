"""What the protections cost in a real local deployment, and a 20-SuperNode run.

One real local deployment per variant (``flwr_guard.demo.run_demo``: the digits app of
``flwr-guard demo`` on a SuperLink and SuperNodes on 127.0.0.1), 4 SuperNodes, audit
off unless said:

- ``plain``: FedAvg, no SecAgg+, no DP-SGD;
- ``secagg``: SecAgg+ alone;
- ``secagg+dp``: SecAgg+ and record-level DP-SGD (the demo's defaults);
- ``secagg+dp+audit``: the same with every node auditing every round (5 s budget),
  to report the audit's share separately.

Per variant: the wall time of each round (between two of the ServerApp's progress
lines; round 1 also materialises each node's data partition), the server-side
seconds of each SecAgg+ stage (the strategy's round report), the ratio of the later
rounds' mean to plain's, and the peak PSS (proportional set size) of every process of
the deployment. Then a scale run: 20 SuperNodes with SecAgg+ and DP-SGD, time and
peak memory per round. Last, a profile of what one message costs a node that does not
train: the ClientApp process start-up and imports.

Usage: python benchmarks/deployment.py [--rounds 3] [--scale-nodes 20] [--scale-rounds 2]
       [--variants plain secagg secagg+dp secagg+dp+audit] [--out PATH]
Prints a table and writes JSON (default benchmarks/results/deployment.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from flwr_guard.demo import DemoOptions, DemoState, run_demo
from flwr_guard.deployment.local import SUPEREXEC_POLL_INTERVAL_S
from flwr_guard.deployment.processes import deployment_pss_bytes

AUDIT_ON = {"audit": True, "audit-round-fraction": 1.0, "audit-client-fraction": 1.0,
            "audit-time-budget": 5.0}
# The app's learning rate (0.5) is tuned for DP-SGD's clipped and noised steps; without
# DP-SGD the first measured run did not learn (test accuracy 0.10) with it. The rate
# changes no cost.
NO_DP_LR = {"learning-rate": 0.05}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"secagg": False, "dp-sgd": False, "audit": False, **NO_DP_LR},
    "secagg": {"secagg": True, "dp-sgd": False, "audit": False, **NO_DP_LR},
    "secagg+dp": {"secagg": True, "dp-sgd": True, "audit": False},
    "secagg+dp+audit": {"secagg": True, "dp-sgd": True, **AUDIT_ON},
}




class _MemorySampler(threading.Thread):
    """(monotonic time, summed PSS in bytes) every ``period_s`` seconds."""

    def __init__(self, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period_s, self.samples = period_s, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic(), deployment_pss_bytes()))
            self._stop_event.wait(self.period_s)

    def stop(self) -> list[tuple[float, int]]:
        self._stop_event.set()
        self.join()
        return self.samples

    def peak(self, start: float, end: float) -> int:
        inside = [pss for t, pss in self.samples if start <= t <= end]
        return max(inside, default=0)


def measure(name: str, run_config: dict[str, Any], nodes: int, rounds: int) -> dict:
    """One real deployment; per-round wall time, stage seconds and peak memory."""
    seen: dict[int, float] = {}

    def stamp(state: DemoState) -> None:
        for line in state.rounds:
            seen.setdefault(line["round"], time.monotonic())

    sampler = _MemorySampler()
    sampler.start()
    started = time.monotonic()
    result = run_demo(DemoOptions(nodes=nodes, rounds=rounds, run_config=run_config,
                                  prometheus=False), stamp)
    wall = time.monotonic() - started
    sampler.stop()
    if not result.success:
        raise SystemExit(f"{name} with {nodes} nodes failed: {result.error}")
    elapsed = {r["round"]: r["elapsed-s"] for r in result.rounds}
    round_s = [round(elapsed[r] - elapsed[r - 1], 2) for r in range(1, rounds + 1)]
    stages = [r.get("secagg", {}).get("stage_seconds", {}) for r in result.rounds[1:]]
    peaks = [sampler.peak(seen.get(r - 1, started), seen.get(r, time.monotonic()))
             for r in range(1, rounds + 1)]
    return {
        "variant": name,
        "nodes": nodes,
        "rounds": rounds,
        "run_config": run_config,
        "round_s": round_s,
        "later_rounds_mean_s": statistics.mean(round_s[1:]) if rounds > 1 else round_s[0],
        "stage_seconds": stages,
        "survivors": [r.get("secagg", {}).get("survivors") for r in result.rounds[1:]],
        "peak_memory_bytes_per_round": peaks,
        "peak_memory_bytes": max(peaks, default=0),
        "demo_wall_s": round(wall, 1),
        "final_test_accuracy": result.final_test_accuracy,
        "dp_sgd_epsilon": result.privacy.get("dp-sgd-epsilon"),
    }


def _import_seconds(statement: str, repeats: int = 2) -> float:
    """Best-of wall time of a fresh interpreter that runs ``statement`` (s)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


def per_message_profile() -> dict[str, float]:
    """What starting a ClientApp process costs before it handles its message (s)."""
    return {
        "python_start_s": _import_seconds("pass"),
        "import_flwr_clientapp_s": _import_seconds("import flwr.clientapp"),
        "import_reference_client_app_s": _import_seconds("import flwr_guard.apps.digits.client_app"),
        "import_torch_s": _import_seconds("import torch"),
        "superexec_poll_interval_s": SUPEREXEC_POLL_INTERVAL_S,
        "supernode_idle_poll_s": 3.0,  # flwr.supernode.start_client_internal, fixed
        "supernode_reply_poll_s": 0.5,  # idem, while the ClientApp works
    }


def _table(rows: list[dict], plain: dict | None) -> Table:
    table = Table(title="flwr-guard on a real local deployment (digits app, audit off "
                  "unless named)")
    for column in ("variant", "SuperNodes", "round 1 (s)", "later rounds (s)", "x plain",
                   "SecAgg+ stages, later round (s)", "peak memory (GiB)", "accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        ratio = (f"{row['later_rounds_mean_s'] / plain['later_rounds_mean_s']:.2f}"
                 if plain and row["nodes"] == plain["nodes"] else "-")
        last = row["stage_seconds"][-1] if row["stage_seconds"] else {}
        stages = " ".join(f"{k} {v:.1f}" for k, v in last.items()) or "-"
        table.add_row(row["variant"], str(row["nodes"]), f"{row['round_s'][0]:.1f}",
                      f"{row['later_rounds_mean_s']:.1f}", ratio, stages,
                      f"{row['peak_memory_bytes'] / 2**30:.2f}",
                      f"{row['final_test_accuracy']:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--scale-nodes", type=int, default=20, help="0 = no scale run")
    parser.add_argument("--scale-rounds", type=int, default=2)
    parser.add_argument("--scale-variant", default="secagg+dp", choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deployment.json"))
    args = parser.parse_args()
    console = Console()
    machine = {"cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
               "python": platform.python_version(), "platform": platform.platform()}
    profile = per_message_profile()
    rows: list[dict] = []

    def save() -> None:  # after every run: a long benchmark keeps what it measured
        plain = next((r for r in rows if r["variant"] == "plain"), None)
        for row in rows:
            if plain and row["nodes"] == plain["nodes"]:
                row["later_rounds_x_plain"] = round(
                    row["later_rounds_mean_s"] / plain["later_rounds_mean_s"], 3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "per_message": profile,
                                        "results": rows}, indent=2) + "\n")

    plan = [(name, VARIANTS[name], args.nodes, args.rounds) for name in args.variants]
    if args.scale_nodes:
        plan.append((f"{args.scale_variant} (scale)", VARIANTS[args.scale_variant],
                     args.scale_nodes, args.scale_rounds))
    for name, run_config, nodes, rounds in plan:
        row = measure(name, run_config, nodes, rounds)
        row["load_average_after"] = [round(x, 2) for x in psutil.getloadavg()]
        rows.append(row)
        save()
        console.print(f"{name}, {nodes} SuperNodes: rounds {row['round_s']} s, load "
                      f"{row['load_average_after']}")
    console.print(_table(rows, next((r for r in rows if r["variant"] == "plain"), None)))
    console.print("per message (a node that does not train): " + ", ".join(
        f"{k} {v}" for k, v in profile.items()))

if __name__ == "__main__":
    main()
