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

Second, because round times on a shared machine drift with its load, the extra
process per message is also timed directly, interleaved (A, B, C, A, B, C, ...; median
of ``--reps``): A = the imports ``flwr-clientapp`` does before it loads an app; B = the
guard's process (the same Flower imports plus the policy, SecAgg+, DP and inspection
mods it builds); C = the quickstart app's own imports (torch, flwr-datasets), paid by
``flwr-clientapp`` and by the guard's child alike. Per message the guard adds about B
(its process) on top of A + C (the child does what ``flwr-clientapp`` did).

Usage: python benchmarks/node_guard.py [--rounds 3] [--reps 5] [--skip-deployment] [--out PATH]
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


STARTUP = {
    "A_flwr_clientapp_imports": "import flwr.supernode.runtime.run_clientapp, flwr.clientapp.utils, flwr.cli.install",
    "B_guard_process": ("import flwr.supernode.runtime.run_clientapp\n"
                        "from flwr_guard.node.policy import NodePolicy\n"
                        "from flwr_guard.node.runner import handle\n"
                        "import flwr_guard.node.app_process, flwr_guard.node.round_log\n"
                        "NodePolicy.from_node_config({'guard-fab-allow-any': True}).train_mods()"),
    "C_quickstart_app_imports": "import torch, datasets, flwr_datasets.partitioner, sklearn.datasets",
}


def startup_times(reps: int) -> dict[str, float]:
    """Median wall time (s) of a fresh interpreter running each snippet (interleaved)."""
    import statistics
    import subprocess

    times: dict[str, list[float]] = {name: [] for name in STARTUP}
    for _ in range(reps):
        for name, code in STARTUP.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/node_guard.json")
    args = parser.parse_args()
    results: dict[str, object] = {"nodes": NODES, "rounds": args.rounds,
                                  "machine": platform.platform(), "lines": server_lines_changed()}
    startup = startup_times(args.reps)
    a, b, c = startup.values()
    results["per_message_startup_s"] = {**startup, "guard_extra_over_flwr_clientapp": b / (a + c)}
    print("startup", results["per_message_startup_s"], flush=True)
    if args.skip_deployment:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
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
