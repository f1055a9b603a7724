"""What the node guard costs: the quickstart's round time on guarded vs plain SuperNodes.

Two real local deployments of 2 SuperNodes on 127.0.0.1 (``LocalDeployment``):

- ``plain``: Flower's quickstart (``tests/fixtures/quickstart/plain``) on plain
  SuperNodes (Flower's own ``flwr-clientapp`` per message);
- ``guard``: the same app on guarded SuperNodes (``node_guard=True``) whose operator
  set ``guard-require-secagg=false``: the only difference is the guard's process and
  the app's child process per message (allow-list check, reply inspection);
- ``guard+secagg+dp``: the quickstart with the server side changed
  (``tests/fixtures/node_guard/quickstart_guarded``: SecAgg+ and distributed DP) on the
  same guarded SuperNodes, i.e. what a guarded node with the default policy runs.

Round time = (wall time of a run of R rounds - wall time of a 1-round run) / (R - 1),
from ``flwr run`` to ``finished:`` as ``flwr ls`` reports it (polled every 0.5 s);
start-up (ServerApp process, data partitioning) cancels out. Also: the lines a user
changes (server side only) between the plain and the guarded quickstart.

Usage: python benchmarks/node_guard.py [--rounds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flwr_guard.deployment import LocalDeployment, Topology
from flwr_guard.secagg.keys import write_federation

PLAIN = ROOT / "tests/fixtures/quickstart/plain"
GUARDED = ROOT / "tests/fixtures/node_guard/quickstart_guarded"
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


def _round_time(deployment: LocalDeployment, app: Path, rounds: int) -> dict[str, float]:
    one = _run_time(deployment, app, 1)
    many = _run_time(deployment, app, rounds)
    return {"run_1_round_s": one, f"run_{rounds}_rounds_s": many,
            "round_s": (many - one) / (rounds - 1)}


def server_lines_changed() -> dict[str, int]:
    """Lines added/removed in server_app.py; client files must be identical."""
    for name in ("client_app.py", "task.py"):
        assert (PLAIN / "quickstart" / name).read_text() == (GUARDED / "quickstart" / name).read_text()
    plain = (PLAIN / "quickstart/server_app.py").read_text().splitlines()
    guarded = (GUARDED / "quickstart/server_app.py").read_text().splitlines()
    diff = list(difflib.unified_diff(plain, guarded, lineterm="", n=0))
    added = [d for d in diff if d.startswith("+") and not d.startswith("+++")]
    removed = [d for d in diff if d.startswith("-") and not d.startswith("---")]
    return {"added": len(added), "removed": len(removed), "client_lines_changed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/node_guard.json")
    args = parser.parse_args()
    results: dict[str, object] = {"nodes": NODES, "rounds": args.rounds,
                                  "machine": platform.platform(), "lines": server_lines_changed()}
    with tempfile.TemporaryDirectory(prefix="node-guard-bench-") as tmp:
        with LocalDeployment(Topology.on_free_ports(nodes=NODES), Path(tmp) / "plain") as dep:
            results["plain"] = _round_time(dep, PLAIN, args.rounds)
            print("plain", results["plain"], flush=True)
        topo = Topology.on_free_ports(
            nodes=NODES,
            node_config={"guard-fab-allow-any": True, "guard-require-secagg": False},
            per_node_config=tuple(write_federation(Path(tmp) / "fed", NODES, min_cohort=NODES)))
        with LocalDeployment(topo, Path(tmp) / "guard", node_guard=True) as dep:
            results["guard"] = _round_time(dep, PLAIN, args.rounds)
            print("guard", results["guard"], flush=True)
            results["guard+secagg+dp"] = _round_time(dep, GUARDED, args.rounds)
            print("guard+secagg+dp", results["guard+secagg+dp"], flush=True)
    base = results["plain"]["round_s"]  # type: ignore[index]
    for name in ("guard", "guard+secagg+dp"):
        results[name]["ratio_to_plain"] = results[name]["round_s"] / base  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
