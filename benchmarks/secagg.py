"""SecAgg+ cost: plain FedAvg vs flwr-guard SecAgg+ vs Flower's own SecAgg+, one run.

Every configuration is one ``flwr run`` of the benchmark app
(``benchmarks/apps/secagg_bench``) in Flower's Ray simulation, started with
:func:`flwr_guard.demo.run_demo`. The app's model is one float32 vector of ``d``
values; clients return global + a seeded random update (no training), so only the
aggregation protocol costs time. Variants (run config ``variant``):

- ``fedavg``: plain FedAvg on the Message API (``flwr.serverapp.strategy.FedAvg``);
- ``guard``: ``SecAggPlus(FedAvg(...))`` + flwr-guard's ``secaggplus_mod``;
- ``flower``: Flower's SecAgg+ on its legacy path (``DefaultWorkflow(fit_workflow=
  SecAggPlusWorkflow(...))`` + ``flwr.client.mod.secaggplus_mod`` on a legacy
  ``ClientApp(client_fn=...)`` with a ``NumPyClient``).

Both SecAgg+ implementations get the same neighbourhood: k neighbours per client
(flwr-guard ``num_shares=k``; Flower ``num_shares=k+1``, since Flower counts the client
itself in its neighbourhood) and the same reconstruction threshold t. Graphs:
``sparse`` (k = 4, t = 3: Flower's num_shares = 5) and ``default`` (flwr-guard's
default k for the cohort, t = floor(k/2) + 1). A case (n, d, dropout) runs all its
variants back to back, so its ratios come from the same minutes of the same machine.

Measured per round (the first round, which starts Ray's actors, is reported but left
out of the means): wall time from ``configure_train`` to the end of ``aggregate_train``
(legacy: one call of the fit workflow); server compute = that time minus the time spent
in ``grid.send_and_receive`` (wall, and the ServerApp thread's CPU time); client compute
= time in the mods + train function per message, summed per client per round (wall and
thread CPU time); bytes per client = payload (RecordDict in Flower's protobuf encoding)
sent to and received from each client per round.

Usage: python benchmarks/secagg.py [--nodes 20 10 5] [--dims 100000 1000000]
       [--graphs sparse default] [--drop-nodes 20] [--rounds 4] [--resume]
Prints a table and writes JSON (default benchmarks/results/secagg.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from flwr_guard.demo import COMPLETED, DemoOptions, DemoState, run_demo
from flwr_guard.deployment.local import CONNECTION
from flwr_guard.secagg.params import default_num_shares, default_threshold

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "benchmarks" / "apps" / "secagg_bench"
SPARSE_K = 4
UPDATE_STAGE = {"fedavg": "train", "guard": "masked-input", "flower": "collect_masked_vectors"}


@dataclass(frozen=True)
class RunSpec:
    """One ``flwr run``: a variant on a cohort of ``nodes`` with a ``dimension``-vector."""

    nodes: int
    dimension: int
    variant: str  # fedavg | guard | flower
    graph: str | None  # sparse | default | None (fedavg)
    drop: tuple[int, ...]  # partition ids that fail at the masked-input stage

    @property
    def k(self) -> int | None:
        if self.graph is None:
            return None
        k = SPARSE_K if self.graph == "sparse" else default_num_shares(self.nodes)
        return min(k, self.nodes - 1)

    @property
    def t(self) -> int | None:
        return None if self.k is None else default_threshold(self.k, self.nodes)

    @property
    def key(self) -> str:
        return f"{self.case}/{self.variant}" + (f"-k{self.k}" if self.k else "")

    @property
    def case(self) -> str:
        return f"n{self.nodes}-d{self.dimension}-drop{len(self.drop)}"


def case_specs(nodes: int, dimension: int, graphs: list[str], drop: tuple[int, ...]) -> list[RunSpec]:
    """FedAvg, then for each distinct k: flwr-guard and Flower."""
    specs = [RunSpec(nodes, dimension, "fedavg", None, drop)]
    seen: set[int] = set()
    for graph in graphs:
        probe = RunSpec(nodes, dimension, "guard", graph, drop)
        if probe.k in seen:
            continue
        seen.add(probe.k)
        specs += [probe, RunSpec(nodes, dimension, "flower", graph, drop)]
    return specs


# -- one run -------------------------------------------------------------------------
def run_one(spec: RunSpec, rounds: int, workdir: Path) -> dict[str, Any]:
    out, log = workdir / "out.json", workdir / "client.jsonl"
    run_config: dict[str, Any] = {
        "variant": spec.variant,
        "dimension": spec.dimension,
        "num-shares": spec.k or 0,
        "reconstruction-threshold": spec.t or 0,
        "drop-partitions": ",".join(map(str, spec.drop)),
        "drop-stage": "masked-input",
        "out-file": str(out),
        "client-log": str(log),
    }
    source_digest = _secagg_source_digest()  # the lead may edit secagg/ while we run
    load_before = os.getloadavg()
    memory_before = psutil.virtual_memory().available
    started = time.monotonic()
    failure_log: list[str] = []

    def on_update(state: DemoState) -> None:
        # A failed run's log lives on the SuperLink: read it while the SuperLink is up.
        if state.status.startswith("finished:") and state.status != COMPLETED and not failure_log:
            failure_log.append(_run_log(workdir / "work", state.run_id))

    result = run_demo(
        DemoOptions(
            nodes=spec.nodes,
            rounds=rounds,
            simulation=True,
            app_dir=APP_DIR,
            run_config=run_config,
            workdir=workdir / "work",
            # `flwr ls` costs ~2 s of CPU: ask rarely, the app says when it has finished.
            status_interval_s=30.0,
            timeout_s=3600.0,
        ),
        on_update,
    )
    record: dict[str, Any] = {
        "key": spec.key,
        "spec": {**asdict(spec), "k": spec.k, "t": spec.t},
        "run_wall_s": round(time.monotonic() - started, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "memory_available_before_bytes": memory_before,
        "secagg_source_sha256": source_digest,
        "uptime_after": _uptime(),
        "success": result.success and out.exists(),
        "error": result.error,
    }
    if failure_log:
        record["run_log_tail"] = failure_log[0][-4000:]
    if record["success"]:
        data = json.loads(out.read_text())
        clients = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        record.update(summarise(spec, data, clients))
    return record


def _run_log(workdir: Path, run_id: str | None) -> str:
    """``flwr log RUN_ID --show`` of the demo's SuperLink (the run's own output)."""
    if run_id is None:
        return ""
    env = {**os.environ, "FLWR_HOME": str(workdir / "flwr-home"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    try:
        done = subprocess.run(["flwr", "log", run_id, CONNECTION, "--show"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"flwr log failed: {err}"
    return done.stdout + done.stderr


def _secagg_source_digest() -> str:
    """SHA-256 over src/flwr_guard/secagg/*.py: which protocol code a run measured."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src/flwr_guard/secagg").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(spec: RunSpec, data: dict[str, Any], clients: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round records and the means over the measured rounds (all but the first)."""
    rounds = []
    for rec in data["rounds"]:
        inside = [c for c in clients if rec["t_start"] <= c["t_end"] <= rec["t_end"]]
        per_node_cpu: dict[int, float] = defaultdict(float)
        per_node_wall: dict[int, float] = defaultdict(float)
        stage_cpu: dict[str, list[float]] = defaultdict(list)
        for c in inside:
            per_node_cpu[c["node"]] += c["cpu_s"]
            per_node_wall[c["node"]] += c["wall_s"]
            stage_cpu[c["stage"]].append(c["cpu_s"])
        update_stage = next((s for s in rec["stages"] if s["stage"] == UPDATE_STAGE[spec.variant]), None)
        survivors = [str(n) for n in update_stage["ok"]] if update_stage else []
        rounds.append(
            {
                "round": rec["round"],
                "completed": rec["completed"],
                "survivors": rec["survivors"],
                "max_abs_error": rec["max_abs_error"],
                "wall_s": rec["wall_s"],
                "grid_wall_s": rec["grid_wall_s"],
                "server_wall_s": rec["server_wall_s"],
                "server_cpu_s": rec["server_cpu_s"],
                "client_cpu_s_per_client": _mean(list(per_node_cpu.values())),
                "client_cpu_s_max": max(per_node_cpu.values(), default=None),
                "client_wall_s_per_client": _mean(list(per_node_wall.values())),
                "client_cpu_s_sum": sum(per_node_cpu.values()),
                # bytes per surviving client (the ones whose update went up)
                "bytes_down_per_client": _mean([rec["bytes_down"].get(n, 0) for n in survivors]),
                "bytes_up_per_client": _mean([rec["bytes_up"].get(n, 0) for n in survivors]),
                "stages": [
                    {
                        "stage": s["stage"],
                        "grid_wall_s": s["grid_wall_s"],
                        "ok": len(s["ok"]),
                        "failed": len(s["failed"]),
                        "client_cpu_s_mean": _mean(stage_cpu.get(s["stage"], [])),
                        "bytes_down_per_client": _mean(list(s["bytes_down"].values())),
                        "bytes_up_per_client": _mean(list(s["bytes_up"].values())),
                    }
                    for s in rec["stages"]
                ],
            }
        )
    measured = [r for r in rounds[1:] if r["completed"]] or [r for r in rounds[1:]]

    def avg(field: str) -> float | None:
        values = [r[field] for r in measured if r[field] is not None]
        return _mean(values)

    return {
        "rounds": rounds,
        "rounds_completed": sum(r["completed"] for r in rounds),
        "rounds_halted": [r["round"] for r in rounds if not r["completed"]],
        "max_abs_error": max((r["max_abs_error"] for r in rounds if r["max_abs_error"] is not None), default=None),
        "measured_rounds": [r["round"] for r in measured],
        "round_s": avg("wall_s"),
        "round_s_values": [round(r["wall_s"], 3) for r in measured],
        "grid_s": avg("grid_wall_s"),
        "server_wall_s": avg("server_wall_s"),
        "server_cpu_s": avg("server_cpu_s"),
        "client_cpu_s": avg("client_cpu_s_per_client"),
        "client_wall_s": avg("client_wall_s_per_client"),
        "client_cpu_s_sum": avg("client_cpu_s_sum"),
        "bytes_down": avg("bytes_down_per_client"),
        "bytes_up": avg("bytes_up_per_client"),
        "flower_num_shares": data.get("flower_num_shares"),
        "guard_stage_seconds": [h["stage_seconds"] for h in data.get("guard_history", [])],
        "guard_modulus_bits": [h["modulus_bits"] for h in data.get("guard_history", [])],
        "guard_aborted": [h["aborted"] for h in data.get("guard_history", [])],
        "guard_dropouts": [h["dropouts"] for h in data.get("guard_history", [])],
    }


# -- ratios and table ----------------------------------------------------------------
def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Ratios against plain FedAvg and (flwr-guard rows) against Flower, same case."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_case[run["key"].split("/")[0]].append(run)
    for group in by_case.values():
        plain = next((r for r in group if r["spec"]["variant"] == "fedavg" and r["success"]), None)
        for run in group:
            if not run["success"] or run.get("round_s") is None:
                continue
            ratios: dict[str, float | None] = {}
            if plain and plain.get("round_s"):
                ratios["round_vs_fedavg"] = run["round_s"] / plain["round_s"]
                ratios["bytes_vs_fedavg"] = (run["bytes_down"] + run["bytes_up"]) / (
                    plain["bytes_down"] + plain["bytes_up"]
                )
                ratios["bytes_up_vs_fedavg"] = run["bytes_up"] / plain["bytes_up"]
            if run["spec"]["variant"] == "guard":
                flower = next(
                    (r for r in group if r["spec"]["variant"] == "flower"
                     and r["spec"]["k"] == run["spec"]["k"] and r["success"]),
                    None,
                )
                if flower and flower.get("round_s"):
                    ratios["round_vs_flower"] = run["round_s"] / flower["round_s"]
                    ratios["server_cpu_vs_flower"] = run["server_cpu_s"] / flower["server_cpu_s"]
                    ratios["client_cpu_vs_flower"] = run["client_cpu_s"] / flower["client_cpu_s"]
            run["ratios"] = ratios


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: list[dict[str, Any]]) -> None:
    table = Table(title="SecAgg+ cost per round (Flower simulation, means over rounds 2..R)")
    columns = ("n", "d", "drop", "variant", "k/t", "rounds ok", "round s", "x FedAvg",
               "x Flower", "server CPU s", "client CPU s", "MB down", "MB up", "bytes x FedAvg")
    for column in columns:
        table.add_column(column, justify="right")
    for run in runs:
        spec = run["spec"]
        name = spec["variant"] if spec["variant"] == "fedavg" else f"{spec['variant']}"
        kt = "-" if spec["k"] is None else f"{spec['k']}/{spec['t']}"
        if not run["success"]:
            table.add_row(str(spec["nodes"]), f"{spec['dimension']:.0e}", str(len(spec["drop"])),
                          name, kt, "failed", *["-"] * 8)
            continue
        ratios = run.get("ratios", {})
        table.add_row(
            str(spec["nodes"]),
            f"{spec['dimension']:.0e}",
            str(len(spec["drop"])),
            name,
            kt,
            f"{run['rounds_completed']}/{len(run['rounds'])}",
            _fmt(run["round_s"], ".2f"),
            _fmt(ratios.get("round_vs_fedavg"), ".2f"),
            _fmt(ratios.get("round_vs_flower"), ".2f"),
            _fmt(run["server_cpu_s"], ".3f"),
            _fmt(run["client_cpu_s"], ".3f"),
            _fmt(run["bytes_down"] and run["bytes_down"] / 1e6, ".3f"),
            _fmt(run["bytes_up"] and run["bytes_up"] / 1e6, ".3f"),
            _fmt(ratios.get("bytes_vs_fedavg"), ".3f"),
        )
    Console(width=max(170, shutil.get_terminal_size().columns)).print(table)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """The table of docs/secagg.md (same numbers as :func:`print_table`)."""
    lines = [
        "| n | d | drop | variant | k / t | rounds ok | round s | × FedAvg | guard ÷ Flower "
        "| server CPU s | client CPU s | MB down | MB up | bytes × FedAvg |",
        "|" + "---|" * 14,
    ]
    for run in runs:
        spec, ratios = run["spec"], run.get("ratios", {})
        kt = "-" if spec["k"] is None else f"{spec['k']} / {spec['t']}"
        name = {"fedavg": "FedAvg", "guard": "flwr-guard", "flower": "Flower"}[spec["variant"]]
        if not run["success"]:
            lines.append(f"| {spec['nodes']} | {spec['dimension']:.0e} | {len(spec['drop'])} | {name} "
                         f"| {kt} | failed |" + " - |" * 8)
            continue
        halted = f" (halted: {', '.join(map(str, run['rounds_halted']))})" if run["rounds_halted"] else ""
        lines.append(
            f"| {spec['nodes']} | {spec['dimension']:.0e} | {len(spec['drop'])} | {name} | {kt} "
            f"| {run['rounds_completed']}/{len(run['rounds'])}{halted} "
            f"| {_fmt(run['round_s'], '.2f')} | {_fmt(ratios.get('round_vs_fedavg'), '.1f')} "
            f"| {_fmt(ratios.get('round_vs_flower'), '.2f')} | {_fmt(run['server_cpu_s'], '.3f')} "
            f"| {_fmt(run['client_cpu_s'], '.3f')} | {_fmt(run['bytes_down'] / 1e6, '.3f')} "
            f"| {_fmt(run['bytes_up'] / 1e6, '.3f')} | {_fmt(ratios.get('bytes_vs_fedavg'), '.3f')} |"
        )
    return "\n".join(lines)


# -- the protocol core alone ----------------------------------------------------------
def core_profile(nodes: int, dimension: int, k: int) -> dict[str, float]:
    """CPU ms of one SecAgg+ round of the core (no Flower): mean per client per stage,
    and the server's stages."""
    import numpy as np

    from flwr_guard.secagg import crypto
    from flwr_guard.secagg.client import SecAggClient
    from flwr_guard.secagg.context import RoundContext
    from flwr_guard.secagg.params import SecAggParams
    from flwr_guard.secagg.policy import SecAggPolicy
    from flwr_guard.secagg.server import SecAggServer

    params = SecAggParams.for_cohort(nodes, k, None, 1.0, 2**16, 1000)
    ids = list(range(1, nodes + 1))
    context = RoundContext(1, 1, tuple(ids), params, dimension + 1, bytes(32))
    policy = SecAggPolicy(trust_on_first_use=True)  # key checks: see secagg_hardening.py
    clients = {i: SecAggClient(i, crypto.ed25519_keypair()[0], policy) for i in ids}
    server = SecAggServer(context)
    rng = np.random.default_rng(0)
    updates = {i: rng.uniform(-0.1, 0.1, dimension).astype(np.float32) for i in ids}
    spent: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn: Any) -> Any:
        started = time.process_time()
        out = fn()
        spent[stage] += time.process_time() - started
        return out

    ads = {i: timed("advertise", lambda c=c: c.advertise(context)) for i, c in clients.items()}
    roster = timed("server: advertisements", lambda: server.receive_advertisements(ads))
    nonces = {i: timed("roster", lambda c=c: c.receive_roster(roster)) for i, c in clients.items()}
    revealed = timed("server: nonces", lambda: server.receive_nonces(nonces))
    shares = {i: timed("share-keys", lambda i=i, c=c: c.share_keys(
        server.neighbour_advertisements(i), revealed)) for i, c in clients.items()}
    routed = timed("server: shares", lambda: server.receive_shares(shares))
    masked = {
        i: timed("masked-input", lambda c=c, i=i: c.masked_input(
            sorted(routed), routed[i], updates[i], 10 + i, context.model_hash)[:2])
        for i, c in clients.items()
    }
    u3 = timed("server: masked inputs", lambda: server.receive_masked_inputs(masked))
    signatures = {i: timed("consistency", lambda i=i: clients[i].consistency(u3)) for i in u3}
    active, dropped, sigs = timed("server: signatures", lambda: server.receive_signatures(signatures))
    requests = {i: server.unmask_signatures(i) for i in sigs}
    reveals = {i: timed("unmask", lambda i=i: clients[i].unmask(active, dropped, requests[i]))
               for i in sigs}
    timed("server: unmask + aggregate", lambda: (server.receive_unmask(reveals), server.aggregate()))
    client_stages = ("advertise", "roster", "share-keys", "masked-input", "consistency", "unmask")
    out = {s: 1000 * spent[s] / nodes for s in client_stages}
    out["client total"] = sum(out[s] for s in client_stages)
    out.update({s: 1000 * v for s, v in spent.items() if s.startswith("server")})
    return {key: round(value, 2) for key, value in out.items()}


def run_core(path: Path) -> None:
    """Core profile for n = 20, d in {1e5, 1e6}, k in {4, 14}; table + JSON. An earlier
    ``core_profile`` in the JSON moves to ``superseded_core_profiles``."""
    rows = []
    for dimension in (100_000, 1_000_000):
        for k in (4, 14):
            rows.append({"nodes": 20, "dimension": dimension, "k": k,
                         "primitives": "as implemented", "ms": core_profile(20, dimension, k)})
    table = Table(title="SecAgg+ core, one round, n = 20: CPU ms per client per stage, server ms")
    stages = list(rows[0]["ms"])
    for column in ("d", "k", "primitives", *stages):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['dimension']:.0e}", str(row["k"]), row["primitives"],
                      *[f"{row['ms'][s]:.1f}" for s in stages])
    Console(width=max(200, shutil.get_terminal_size().columns)).print(table)
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if "core_profile" in data:
        data.setdefault("superseded_core_profiles", []).append(data["core_profile"])
    data["core_profile"] = {"loadavg": [round(x, 2) for x in os.getloadavg()],
                            "git_commit": _git_commit(),
                            "secagg_source_sha256": _secagg_source_digest(), "rows": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")


def _git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip()


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    commit = _git_commit()
    return {
        "machine": {"cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "python": platform.python_version(), "platform": platform.platform()},
        "versions": {p: version(p) for p in ("flwr", "pycryptodome", "cryptography", "numpy", "ray")},
        "invocations": [{"git_commit": commit, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "argv": sys.argv[1:]}],
        "rounds_per_run": args.rounds,
        "simulation": "Flower Ray simulation, default client resources (2 CPUs per client: "
                      "one ClientApp actor at a time on this 2-core machine)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 10, 5])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--graphs", nargs="+", default=["sparse", "default"],
                        choices=["sparse", "default"])
    parser.add_argument("--drop-nodes", type=int, nargs="*", default=[20],
                        help="cohort sizes that also get a case with --drop-count dropouts")
    parser.add_argument("--drop-count", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already complete in --out, run the others")
    parser.add_argument("--rerun", nargs="*", default=[], metavar="CASE",
                        help="with --resume: run these cases again (e.g. n20-d1000000-drop0); "
                             "their earlier runs move to `superseded_runs` in the JSON")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/secagg.json")
    parser.add_argument("--core", action="store_true",
                        help="run only the protocol core (no Flower), n = 20, d in {1e5, 1e6}, "
                             "k in {4, 14}; store under `core_profile` (an earlier one moves to "
                             "`superseded_core_profiles`)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print the table of --out, and its markdown")
    args = parser.parse_args()
    if args.core:
        run_core(args.out)
        return
    if args.report:
        saved = json.loads(args.out.read_text())["runs"]
        add_ratios(saved)
        print_table(saved)
        print(markdown_table(saved))
        return
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    cases: list[list[RunSpec]] = []
    for nodes in args.nodes:
        for dimension in args.dims:
            cases.append(case_specs(nodes, dimension, args.graphs, ()))
            if nodes in args.drop_nodes:
                # spread over the partition ids: partitions n/4 and 3n/4
                drop = tuple(sorted({(i * 2 + 1) * nodes // (2 * args.drop_count)
                                     for i in range(args.drop_count)}))
                cases.append(case_specs(nodes, dimension, args.graphs, drop))

    previous: dict[str, dict[str, Any]] = {}
    superseded: list[dict[str, Any]] = []
    if args.resume and args.out.exists():
        saved = json.loads(args.out.read_text())
        superseded = saved.get("superseded_runs", [])
        for run in saved["runs"]:
            if run["key"].split("/")[0] in args.rerun:
                superseded.append(run)
            else:
                previous[run["key"]] = run
    runs: list[dict[str, Any]] = []
    meta = _meta(args)
    if args.resume and args.out.exists():
        earlier = json.loads(args.out.read_text())["meta"]
        meta["invocations"] = earlier.get("invocations", [
            {"git_commit": earlier.get("git_commit"), "argv": "first pass"}]) + meta["invocations"]
    for specs in cases:
        if all(s.key in previous and previous[s.key]["success"] for s in specs):
            runs += [previous[s.key] for s in specs]
            continue
        for spec in specs:  # the whole case back to back
            workdir = Path(tempfile.mkdtemp(prefix="flwr-guard-secagg-bench-"))
            Console().print(f"[bold]{spec.key}[/bold] ...")
            record = run_one(spec, args.rounds, workdir)
            if not record["success"]:  # e.g. Ray killed an actor when memory ran short
                Console().print(f"  failed ({record['error']}); retrying once")
                retry_dir = Path(tempfile.mkdtemp(prefix="flwr-guard-secagg-bench-"))
                failed, record = record, run_one(spec, args.rounds, retry_dir)
                record["previous_attempt"] = {k: failed.get(k) for k in
                                              ("error", "run_log_tail", "loadavg_before",
                                               "memory_available_before_bytes")}
                shutil.rmtree(workdir, ignore_errors=True)
                workdir = retry_dir
            if record["success"]:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                record["workdir"] = str(workdir)
            Console().print(
                f"  {'ok' if record['success'] else 'FAILED'}: round {_fmt(record.get('round_s'), '.2f')} s, "
                f"{record.get('rounds_completed', 0)} rounds completed, run {record['run_wall_s']} s"
            )
            runs.append(record)
            add_ratios(runs)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            kept = [r for k, r in previous.items() if k not in {x["key"] for x in runs}]
            _write(args.out, meta, kept + runs, superseded)
    kept = [r for k, r in previous.items() if k not in {x["key"] for x in runs}]
    add_ratios(kept + runs)
    print_table(kept + runs)
    _write(args.out, meta, kept + runs, superseded)


def _write(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]],
           superseded: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}  # keeps `core_profile`
    data.update({"meta": meta, "runs": runs, "superseded_runs": superseded})
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
