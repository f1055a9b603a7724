"""The node guard's round time against plain SuperNodes, interleaved in one run.

Issue 19 asks for the round time of Flower's quickstart on guarded nodes vs plain (the
extra process per message). ``benchmarks/node_guard.py`` ran its deployments one after
the other, and the shared machine's load swung more than the guard costs; here both
deployments stay up side by side and their runs alternate, so drift hits both alike:

- ``plain``: Flower's quickstart (``tests/fixtures/quickstart/plain``, no flwr_guard
  import) on 2 plain SuperNodes (Flower's ``flwr-clientapp`` per message);
- ``guard``: the same app and server on 2 guarded SuperNodes (``node_guard=True``) whose
  operator pinned the app's FAB and set ``guard-require-secagg=false``: the difference
  is the guard's process per message (allow-list, the structural trap check, reply
  inspection, the node-config strip and ledger hand-out) and the app's child process;
- ``guard+secagg+dp`` (``--secagg``): the quickstart with the server side changed
  (``tests/fixtures/node_guard/quickstart_guarded``: SecAgg+ and distributed DP), on
  2 more guarded SuperNodes with the default policy (SecAgg+ required): what a user of
  the guard runs. Its ratio to ``plain`` includes SecAgg+'s 5 messages per round.

Round time = (wall time of an R-round run - that of a 1-round run) / (R - 1), ``flwr
run`` to ``finished:completed`` as ``flwr ls`` reports it (polled every 0.5 s), so
start-up cancels out. Each repetition runs, in turn: plain 1, guard 1, [secagg 1,]
plain R, guard R, [secagg R]; the ratio is taken per repetition and the median
reported. Also: the lines a user changes (server side only).

Usage: python benchmarks/node_guard_rounds.py [--rounds 3] [--reps 1] [--secagg] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flwr.cli.build import build_fab_from_disk
from node_guard import GUARDED, PLAIN, server_lines_changed

from flwr_guard.deployment import LocalDeployment, Topology
from flwr_guard.node.allowlist import fab_hash
from flwr_guard.secagg.keys import write_federation

NODES = 2


def _run_time(deployment: LocalDeployment, app: Path, rounds: int) -> float:
    started = time.monotonic()
    run_id = deployment.submit(app, {"num-server-rounds": rounds})
    while True:
        deployment.check_alive()
        status = str(deployment.run_info(run_id).get("status", ""))
        if status.startswith("finished:"):
            if status != "finished:completed":
                raise RuntimeError(f"run {run_id} of {app.name}: {status}")
            return time.monotonic() - started
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--secagg", action="store_true", help="also guard+secagg+dp")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/node_guard_rounds.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (a round time is a difference of runs)")
    results: dict[str, object] = {
        "nodes": NODES, "rounds": args.rounds, "reps": args.reps,
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(), "lines": server_lines_changed(),
    }
    variants = ["plain", "guard", *(["guard+secagg+dp"] if args.secagg else [])]
    apps = {"plain": PLAIN, "guard": PLAIN, "guard+secagg+dp": GUARDED}
    times: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="node-guard-rounds-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        deployments = {"plain": stack.enter_context(
            LocalDeployment(Topology.on_free_ports(nodes=NODES), base / "plain"))}
        pins = ",".join(fab_hash(build_fab_from_disk(app)) for app in (PLAIN, GUARDED))
        deployments["guard"] = stack.enter_context(LocalDeployment(Topology.on_free_ports(
            nodes=NODES, node_config={"guard-fab-hashes": pins, "guard-require-secagg": False}),
            base / "guard", node_guard=True))
        if args.secagg:
            deployments["guard+secagg+dp"] = stack.enter_context(LocalDeployment(
                Topology.on_free_ports(
                    nodes=NODES, node_config={"guard-fab-hashes": pins},
                    per_node_config=tuple(write_federation(base / "fed", NODES, min_cohort=NODES))),
                base / "secagg", node_guard=True))
        for rep in range(args.reps):
            run: dict[str, dict[str, float]] = {v: {} for v in variants}
            for rounds in (1, args.rounds):
                for v in variants:
                    run[v][f"run_{rounds}_s"] = _run_time(deployments[v], apps[v], rounds)
                    print(rep, v, rounds, run[v], flush=True)
            for v in variants:
                run[v]["round_s"] = (run[v][f"run_{args.rounds}_s"] - run[v]["run_1_s"]) / (args.rounds - 1)
                run[v]["ratio_to_plain"] = run[v]["round_s"] / run["plain"]["round_s"]
                times[v].append(run[v])
    results["load_average_at_end"] = os.getloadavg()
    results["runs"] = times
    results["median"] = {v: {"round_s": statistics.median(r["round_s"] for r in times[v]),
                             "ratio_to_plain": statistics.median(r["ratio_to_plain"] for r in times[v])}
                         for v in variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
