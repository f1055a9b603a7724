"""SecAgg+ cost: plain FedAvg vs flwr-guard SecAgg+ vs Flower's own SecAgg+, one run.

Every configuration is one ``flwr run`` of the benchmark app
(``benchmarks/apps/secagg_bench``) in Flower's Ray simulation, started with
:func:`flwr_guard.demo.run_demo`. The app's model is one float32 vector of ``d``
values; clients return global + a seeded random update (no training), so only the
aggregation protocol costs time. Variants (run config ``variant``):

- ``fedavg``: plain FedAvg on the Message API (``flwr.serverapp.strategy.FedAvg``);
- ``guard``: ``SecAggPlus(FedAvg(...), multi_round=...)`` + flwr-guard's
  ``secaggplus_mod``; path ``multi-round`` (keys set up once per cohort, the default) or
  ``per-round`` (the whole protocol every round);
- ``guard-dp``: ``GuardedStrategy(FedAvg(...), secagg=SecAgg(...),
  dp=DistributedDP(...))`` + ``ClientGuard(ClientPolicy(secagg=True,
  dp="distributed")).train_mods()``: SecAgg+ with the clients' Skellam noise;
- ``flower``: Flower's SecAgg+ on its legacy path (``DefaultWorkflow(fit_workflow=
  SecAggPlusWorkflow(...))`` + ``flwr.client.mod.secaggplus_mod`` on a legacy
  ``ClientApp(client_fn=...)`` with a ``NumPyClient``).

Both SecAgg+ implementations get the same neighbourhood: k neighbours per client
(flwr-guard ``num_shares=k``; Flower ``num_shares=k+1``, since Flower counts the client
itself in its neighbourhood) and the same reconstruction threshold t. Graphs:
``sparse`` (k = 4, t = 3: Flower's num_shares = 5) and ``default`` (flwr-guard's
default k for the cohort, t from :func:`default_threshold`). A case (n, d, dropout,
sampled fraction) runs all its variants back to back, so its ratios come from the
same minutes of the same machine.

The default suite (``--suite issue14``, one invocation, about 20 minutes here):
n = 20, d = 1e6 (FedAvg, flwr-guard on both paths, default k); n = 100, d = 1e5
(FedAvg, flwr-guard on both paths, Flower; k = 4); n = 1000 virtual clients, d = 1e4,
``fraction_train=0.1`` (cohorts of 100, default k), FedAvg and flwr-guard with
distributed DP; then the protocol core's server cost against n (``--core-vs-n``: no
Flower, n in {20, 100, 1000}, both paths, fixed k and d, fitted, plotted to
``docs/img/secagg_cost_vs_n.png``). ``--suite matrix`` is the earlier n x d x graph
matrix.

Before round 1 the ServerApp sends one empty query to a few nodes (Ray's actors start
and import the ClientApp then, outside the timed rounds). Measured per round: round 1
(flwr-guard's multi-round path: the key set-up) on its own, the mean over rounds 2..R
(the steady state) and the mean over all rounds; wall time from ``configure_train`` to
the end of ``aggregate_train`` (legacy: one call of the fit workflow); server compute
= that time minus the time spent in the grid's exchanges (wall, and the ServerApp
thread's CPU time); client compute = time in the mods + train function per message,
summed per client per round (wall and thread CPU time); bytes per client = payload
(RecordDict in Flower's protobuf encoding) sent to and received from each client per
round, and their overhead over FedAvg's in bytes and per k log2(cohort); memory = the
peak, within the round, of the summed PSS of every process the run started (SuperLink,
SuperExec, simulation, Ray's GCS, raylet and actors), sampled every 0.5 s.

Usage: python benchmarks/secagg.py                 # the issue-14 suite
       python benchmarks/secagg.py --core-vs-n     # the core's cost against n only
       python benchmarks/secagg.py --report        # table of the JSON
       python benchmarks/secagg.py --issue20 --label before|after [--reps 3]
           # issue 20's round cost in process, n = 20 and 100 (secagg_issue20_cost.json)
       python benchmarks/secagg.py --suite matrix [--nodes 20 10 5] [--dims 100000 1000000]
           [--graphs sparse default] [--paths multi-round per-round] [--drop-nodes 20]
           [--rounds 4] [--resume]
Prints tables and writes JSON (benchmarks/results/secagg_issue14.json,
secagg_cost_vs_n.json; the matrix and --core: secagg.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
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
UPDATE_STAGE = {"fedavg": "train", "guard": "masked-input", "guard-dp": "masked-input",
                "flower": "collect_masked_vectors"}


@dataclass(frozen=True)
class RunSpec:
    """One ``flwr run``: a variant on ``nodes`` virtual clients with a ``dimension``-vector.

    ``fraction`` of the nodes is sampled per round (FedAvg ``fraction_train``): the cohort
    is ``int(fraction * nodes)``. ``multi_round`` (flwr-guard variants): keys set up once
    per cohort (``SecAggPlus(multi_round=True)``) or every round (``False``).
    """

    nodes: int
    dimension: int
    variant: str  # fedavg | guard | guard-dp | flower
    graph: str | None  # sparse | default | None (fedavg)
    drop: tuple[int, ...]  # partition ids that fail at the masked-input stage
    multi_round: bool = True
    fraction: float = 1.0
    rounds: int | None = None  # None: --rounds

    @property
    def cohort(self) -> int:
        return max(int(self.fraction * self.nodes), 2)

    @property
    def k(self) -> int | None:
        if self.graph is None:
            return None
        if self.graph.startswith("k="):  # a fixed k, e.g. "k=8"
            k = int(self.graph[2:])
        else:
            k = SPARSE_K if self.graph == "sparse" else default_num_shares(self.cohort)
        return min(k, self.cohort - 1)

    @property
    def t(self) -> int | None:
        return None if self.k is None else default_threshold(self.k, self.cohort)

    @property
    def path(self) -> str | None:
        """``multi-round`` / ``per-round`` for flwr-guard, ``None`` otherwise."""
        if not self.variant.startswith("guard"):
            return None
        return "multi-round" if self.multi_round else "per-round"

    @property
    def key(self) -> str:
        key = f"{self.case}/{self.variant}" + (f"-k{self.k}" if self.k else "")
        if self.path is not None:
            key += "-mr" if self.multi_round else "-pr"
        return key

    @property
    def case(self) -> str:
        case = f"n{self.nodes}-d{self.dimension}-drop{len(self.drop)}"
        return case + (f"-f{self.fraction:g}" if self.fraction < 1 else "")


def case_specs(nodes: int, dimension: int, graphs: list[str], drop: tuple[int, ...],
               paths: tuple[bool, ...] = (True,), flower: bool = True) -> list[RunSpec]:
    """FedAvg, then for each distinct k: flwr-guard on each path (multi-round first),
    and Flower."""
    specs = [RunSpec(nodes, dimension, "fedavg", None, drop)]
    seen: set[int] = set()
    for graph in graphs:
        probe = RunSpec(nodes, dimension, "guard", graph, drop)
        if probe.k in seen:
            continue
        seen.add(probe.k)
        specs += [RunSpec(nodes, dimension, "guard", graph, drop, multi_round=m) for m in paths]
        if flower:
            specs.append(RunSpec(nodes, dimension, "flower", graph, drop))
    return specs


def issue14_cases(rounds: int, scale_rounds: int) -> list[list[RunSpec]]:
    """The suite of issue 14, one invocation (each inner list runs back to back):

    - n = 20, d = 1e6, default k: FedAvg, flwr-guard multi-round and per-round;
    - n = 100, d = 1e5, k = 8, t = 7 (Flower ``num_shares=9``), one round fewer:
      FedAvg, flwr-guard multi-round, Flower's SecAgg+;
    - n = 1000 virtual clients, d = 1e4, FedAvg ``fraction_train=0.1`` (cohorts of 100,
      default k): FedAvg, and flwr-guard SecAgg+ with distributed DP
      (``GuardedStrategy(FedAvg, secagg=SecAgg(), dp=DistributedDP(...))``), multi-round.
    """
    n20 = case_specs(20, 1_000_000, ["default"], (), paths=(True, False), flower=False)
    # k = 4 is refused at n = 100 by the clients' policy (2t > k + c needs t > 4 with the
    # c = 4 corrupt neighbours of Bell et al.'s bound): k = 8, t = 7 (Flower num_shares=9).
    n100 = case_specs(100, 100_000, ["k=8"], (), paths=(True,), flower=True)
    scale = [
        RunSpec(1000, 10_000, "fedavg", None, (), fraction=0.1, rounds=scale_rounds),
        RunSpec(1000, 10_000, "guard-dp", "default", (), multi_round=True, fraction=0.1,
                rounds=scale_rounds),
    ]
    return [[replace(s, rounds=rounds) for s in n20], scale,
            [replace(s, rounds=max(rounds - 1, 2)) for s in n100]]


# -- memory ------------------------------------------------------------------------------
class MemorySampler(threading.Thread):
    """Samples, every ``interval_s``, the memory of this process's descendants (the
    SuperLink, its SuperExec, the simulation process, Ray's GCS, raylet and workers):
    the sum of their PSS (proportional set size: shared pages counted once over the
    processes that share them; RSS where PSS cannot be read), their RSS, their count,
    and the machine's used memory (``psutil.virtual_memory().used``), all in bytes."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.names: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._stop_event.wait(self.interval_s):
            pss = rss = count = 0
            for proc in me.children(recursive=True):
                try:
                    info = proc.memory_full_info()
                    name = proc.name()
                except psutil.Error:
                    continue
                pss += getattr(info, "pss", info.rss)
                rss += info.rss
                count += 1
                self.names.add(name)
            self.samples.append({"t": time.time(), "pss_bytes": pss, "rss_bytes": rss,
                                 "processes": count,
                                 "used_bytes": psutil.virtual_memory().used})

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def peak(self, t_start: float, t_end: float) -> dict[str, Any] | None:
        """Largest PSS sum (and the RSS sum, process count and used memory of that
        sample) between ``t_start`` and ``t_end`` (wall clock); ``None`` if no sample."""
        inside = [x for x in self.samples if t_start <= x["t"] <= t_end]
        if not inside:  # a round shorter than the interval: the last sample before its end
            inside = [x for x in self.samples if x["t"] <= t_end][-1:]
        if not inside:
            return None
        top = max(inside, key=lambda x: x["pss_bytes"])
        return {k: v for k, v in top.items() if k != "t"}


# -- one run -------------------------------------------------------------------------
def run_one(spec: RunSpec, rounds: int, workdir: Path) -> dict[str, Any]:
    rounds = spec.rounds or rounds
    out, log = workdir / "out.json", workdir / "client.jsonl"
    run_config: dict[str, Any] = {
        "variant": spec.variant,
        "multi-round": spec.multi_round,
        "fraction-train": spec.fraction,
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
    sampler = MemorySampler()
    sampler.start()

    def on_update(state: DemoState) -> None:
        # A failed run's log lives on the SuperLink: read it while the SuperLink is up.
        if state.status.startswith("finished:") and state.status != COMPLETED and not failure_log:
            failure_log.append(_run_log(workdir / "work", state.run_id))

    crashed: str | None = None
    try:
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
    except Exception as err:  # e.g. `flwr ls` timing out on an overloaded machine
        crashed = f"{type(err).__name__}: {err}"
        result = None
    finally:
        sampler.stop()
    record: dict[str, Any] = {
        "key": spec.key,
        "spec": {**asdict(spec), "rounds": rounds, "cohort": spec.cohort, "k": spec.k,
                 "t": spec.t, "path": spec.path},
        "run_wall_s": round(time.monotonic() - started, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "memory_available_before_bytes": memory_before,
        "secagg_source_sha256": source_digest,
        "uptime_after": _uptime(),
        "success": result is not None and result.success and out.exists(),
        "error": crashed if result is None else result.error,
        "memory_peak_run": sampler.peak(0.0, float("inf")),
        "memory_processes": sorted(sampler.names),
    }
    if failure_log:
        record["run_log_tail"] = failure_log[0][-4000:]
    if record["success"]:
        data = json.loads(out.read_text())
        clients = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        record.update(summarise(spec, data, clients, sampler))
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


def summarise(spec: RunSpec, data: dict[str, Any], clients: list[dict[str, Any]],
              sampler: MemorySampler | None = None) -> dict[str, Any]:
    """Per-round records; the first round (Ray's actors start; flwr-guard's multi-round
    path sets up its keys) on its own (``setup_*``); the means over rounds 2..R (the
    steady state, ``round_s`` etc.) and over all completed rounds (``*_all``)."""
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
                "update_std": rec.get("update_std"),
                "memory_peak": sampler.peak(rec["t_start"], rec["t_end"]) if sampler else None,
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

    def avg(field: str, over: list[dict[str, Any]] | None = None) -> float | None:
        values = [r[field] for r in (measured if over is None else over) if r[field] is not None]
        return _mean(values)

    completed = [r for r in rounds if r["completed"]]
    first = rounds[0] if rounds else None
    peaks = [r["memory_peak"]["pss_bytes"] for r in rounds if r["memory_peak"]]
    setup = {} if first is None else {
        "setup_round_s": first["wall_s"],
        "setup_server_cpu_s": first["server_cpu_s"],
        "setup_client_cpu_s": first["client_cpu_s_per_client"],
        "setup_bytes_down": first["bytes_down_per_client"],
        "setup_bytes_up": first["bytes_up_per_client"],
    }
    return {
        **setup,
        "round_s_all": avg("wall_s", completed),
        "bytes_down_all": avg("bytes_down_per_client", completed),
        "bytes_up_all": avg("bytes_up_per_client", completed),
        "memory_peak_pss_bytes": max(peaks, default=None),
        "memory_pss_bytes_per_round": peaks,
        "update_std": [r["update_std"] for r in rounds],
        "dp_epsilon": data.get("dp_epsilon"),
        "dp_min_contributors": data.get("dp_min_contributors"),
        "dp_expected_update_std": data.get("dp_expected_update_std"),
        "cohort": data.get("cohort"),
        "warm_up_s": data.get("warm_up_s"),
        "multi_round": data.get("multi_round"),
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
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Ratios against plain FedAvg and (flwr-guard rows) against Flower, same case.

    ``round_vs_fedavg``: rounds 2..R; ``setup_vs_fedavg``: round 1 over FedAvg's round 1;
    ``all_vs_fedavg``: mean over all rounds. Bytes: ``overhead_bytes`` = (down + up) per
    client and round minus FedAvg's (rounds 2..R; ``setup_overhead_bytes`` for round 1),
    and the same in units of k log2(cohort) (``overhead_per_klogn``: bytes per unit);
    ``bytes_up_vs_fedavg`` is the masked upload over the plain update.
    """
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_case[run["key"].split("/")[0]].append(run)
    for group in by_case.values():
        plain = next((r for r in group if r["spec"]["variant"] == "fedavg" and r["success"]), None)
        for run in group:
            if not run["success"] or run.get("round_s") is None:
                continue
            spec = run["spec"]
            ratios: dict[str, float | None] = {}
            if run.get("bytes_down") is None:  # no round completed: no bytes to compare
                run["ratios"] = ratios
                continue
            if plain and plain.get("round_s"):
                ratios["round_vs_fedavg"] = _ratio(run["round_s"], plain["round_s"])
                ratios["setup_vs_fedavg"] = _ratio(run.get("setup_round_s"), plain.get("setup_round_s"))
                ratios["all_vs_fedavg"] = _ratio(run.get("round_s_all"), plain.get("round_s_all"))
                plain_bytes = plain["bytes_down"] + plain["bytes_up"]
                ratios["bytes_vs_fedavg"] = (run["bytes_down"] + run["bytes_up"]) / plain_bytes
                ratios["bytes_up_vs_fedavg"] = run["bytes_up"] / plain["bytes_up"]
                ratios["overhead_bytes"] = run["bytes_down"] + run["bytes_up"] - plain_bytes
                if run.get("setup_bytes_down") is not None and plain.get("setup_bytes_down"):
                    ratios["setup_overhead_bytes"] = (
                        run["setup_bytes_down"] + run["setup_bytes_up"]
                        - plain["setup_bytes_down"] - plain["setup_bytes_up"])
                if spec.get("k"):
                    klogn = spec["k"] * math.log2(spec.get("cohort") or spec["nodes"])
                    ratios["klogn"] = klogn
                    ratios["overhead_per_klogn"] = ratios["overhead_bytes"] / klogn
                    if "setup_overhead_bytes" in ratios:
                        ratios["setup_overhead_per_klogn"] = ratios["setup_overhead_bytes"] / klogn
            if spec["variant"].startswith("guard"):
                flower = next(
                    (r for r in group if r["spec"]["variant"] == "flower"
                     and r["spec"]["k"] == spec["k"] and r["success"]),
                    None,
                )
                if flower and flower.get("round_s"):
                    ratios["round_vs_flower"] = _ratio(run["round_s"], flower["round_s"])
                    ratios["all_vs_flower"] = _ratio(run.get("round_s_all"), flower.get("round_s_all"))
                    ratios["server_cpu_vs_flower"] = _ratio(run["server_cpu_s"], flower["server_cpu_s"])
                    ratios["client_cpu_vs_flower"] = _ratio(run["client_cpu_s"], flower["client_cpu_s"])
            run["ratios"] = ratios


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


VARIANT_NAMES = {"fedavg": "FedAvg", "guard": "flwr-guard", "guard-dp": "flwr-guard + DistributedDP",
                 "flower": "Flower"}
COLUMNS = ("n", "cohort", "d", "drop", "variant", "path", "k / t", "rounds ok", "round 1 s",
           "rounds 2..R s", "all rounds s", "× FedAvg (2..R)", "× FedAvg (round 1)",
           "× FedAvg (all)", "guard ÷ Flower (2..R)", "server CPU s", "client CPU s",
           "MB down", "MB up", "bytes × FedAvg", "overhead kB", "overhead B / (k log2 n)",
           "peak PSS GB")


def _row(run: dict[str, Any], markdown: bool) -> list[str]:
    spec, ratios = run["spec"], run.get("ratios", {})
    kt = "-" if spec["k"] is None else f"{spec['k']} / {spec['t']}"
    head = [str(spec["nodes"]), str(spec.get("cohort", spec["nodes"])), f"{spec['dimension']:.0e}",
            str(len(spec["drop"])), VARIANT_NAMES[spec["variant"]], spec.get("path") or "-", kt]
    if not run["success"]:
        return head + ["failed"] + ["-"] * (len(COLUMNS) - len(head) - 1)
    halted = (f" (halted: {', '.join(map(str, run['rounds_halted']))})"
              if markdown and run["rounds_halted"] else "")
    peak = run.get("memory_peak_pss_bytes")
    return head + [
        f"{run['rounds_completed']}/{len(run['rounds'])}{halted}",
        _fmt(run.get("setup_round_s"), ".2f"),
        _fmt(run["round_s"], ".2f"),
        _fmt(run.get("round_s_all"), ".2f"),
        _fmt(ratios.get("round_vs_fedavg"), ".2f"),
        _fmt(ratios.get("setup_vs_fedavg"), ".2f"),
        _fmt(ratios.get("all_vs_fedavg"), ".2f"),
        _fmt(ratios.get("round_vs_flower"), ".2f"),
        _fmt(run["server_cpu_s"], ".3f"),
        _fmt(run["client_cpu_s"], ".3f"),
        _fmt(run["bytes_down"] and run["bytes_down"] / 1e6, ".3f"),
        _fmt(run["bytes_up"] and run["bytes_up"] / 1e6, ".3f"),
        _fmt(ratios.get("bytes_vs_fedavg"), ".3f"),
        _fmt(ratios.get("overhead_bytes") and ratios["overhead_bytes"] / 1e3, ".1f"),
        _fmt(ratios.get("overhead_per_klogn"), ".1f"),
        _fmt(peak and peak / 2**30, ".2f"),
    ]


def print_table(runs: list[dict[str, Any]]) -> None:
    table = Table(title="SecAgg+ cost per round (Flower simulation; round 1 = set-up round, "
                        "means over rounds 2..R and over all rounds)")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(*_row(run, markdown=False))
    Console(width=max(260, shutil.get_terminal_size().columns)).print(table)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """The table of docs/secagg.md (same numbers as :func:`print_table`)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(run, markdown=True)) + " |" for run in runs]
    return "\n".join(lines)


def memory_table(runs: list[dict[str, Any]]) -> str:
    """Per round: wall time and the peak PSS of the run's processes (markdown)."""
    lines = ["| run | round | wall s | server CPU s | peak PSS GB | processes | machine used GB |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        for rec in run.get("rounds", []):
            peak = rec.get("memory_peak") or {}
            lines.append(
                f"| {run['key']} | {rec['round']} | {rec['wall_s']:.2f} | {rec['server_cpu_s']:.3f} "
                f"| {_fmt(peak.get('pss_bytes') and peak['pss_bytes'] / 2**30, '.2f')} "
                f"| {peak.get('processes', '-')} "
                f"| {_fmt(peak.get('used_bytes') and peak['used_bytes'] / 2**30, '.2f')} |")
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
            sorted(routed), routed[i], updates[i], 10 + i % 90, context.model_hash)[:2])
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


# -- the server's cost against n (core, no Flower) -------------------------------------
COST_VS_N_JSON = REPO / "benchmarks/results/secagg_cost_vs_n.json"
COST_VS_N_PLOT = REPO / "docs/img/secagg_cost_vs_n.png"
COST_NODES = (20, 100, 1000)
COST_DIMENSION = 10_000
COST_K = 14  # fixed graph degree (t = 8): the growth in n alone
COST_ROUNDS = 3


def _server_ms(profile: dict[str, float]) -> float:
    return sum(v for s, v in profile.items() if s.startswith("server"))


def per_round_cost(nodes: int, dimension: int, k: int, rounds: int) -> dict[str, Any]:
    """The per-round path: every round is the whole protocol (:func:`core_profile`,
    fresh keys); server CPU ms per round (median over ``rounds``), client CPU ms."""
    profiles = [core_profile(nodes, dimension, k) for _ in range(rounds)]
    server = [round(_server_ms(p), 2) for p in profiles]
    return {"setup_ms": None, "round_ms": statistics.median(server), "round_ms_values": server,
            "client_round_ms": statistics.median(p["client total"] for p in profiles),
            "stages_ms": profiles[-1]}


def multi_round_cost(nodes: int, dimension: int, k: int, rounds: int) -> dict[str, Any]:
    """The multi-round path (:mod:`flwr_guard.secagg.session_client`): the key set-up once
    (advertise, roster, the session opened by the first input message), then ``rounds``
    session rounds (masked input, consistency, unmask with the survivors' own self-mask
    seeds), all clients in every round. Server CPU ms: ``setup_ms`` (the set-up stages
    alone), ``round_ms`` (median over the session's rounds), ``setup_round_ms`` (set-up +
    the first round: the round that sets keys up); client CPU ms likewise."""
    import numpy as np

    from flwr_guard.secagg import crypto
    from flwr_guard.secagg.client import SecAggClient
    from flwr_guard.secagg.context import RoundContext
    from flwr_guard.secagg.params import SecAggParams
    from flwr_guard.secagg.policy import SecAggPolicy
    from flwr_guard.secagg.server import SecAggServer
    from flwr_guard.secagg.session_client import SessionClient
    from flwr_guard.secagg.session_server import SessionServer

    params = SecAggParams.for_cohort(nodes, k, None, 1.0, 2**16, 1000)
    ids = list(range(1, nodes + 1))
    context = RoundContext(run_id=1, server_round=1, cohort=tuple(ids), params=params,
                           vector_length=dimension + 1, model_hash=bytes(32), multi_round=True)
    policy = SecAggPolicy(trust_on_first_use=True)
    setups = {i: SecAggClient(i, crypto.ed25519_keypair()[0], policy) for i in ids}
    rng = np.random.default_rng(0)
    server_ms: dict[str, float] = defaultdict(float)
    client_ms: dict[str, float] = defaultdict(float)

    def timed(bucket: dict[str, float], stage: str, fn: Any) -> Any:
        started = time.process_time()
        out = fn()
        bucket[stage] += 1000 * (time.process_time() - started)
        return out

    ads = {i: timed(client_ms, "setup", lambda c=c: c.advertise(context)) for i, c in setups.items()}
    roster = timed(server_ms, "setup", lambda: SecAggServer(context))
    roster_server = roster
    packed = timed(server_ms, "setup", lambda: roster_server.receive_advertisements(ads))
    nonces = {i: timed(client_ms, "setup", lambda c=c: c.receive_roster(packed)) for i, c in setups.items()}
    timed(server_ms, "setup", lambda: roster_server.receive_nonces(nonces))
    session = timed(server_ms, "setup", lambda: SessionServer(roster_server))
    opened = {i: timed(server_ms, "setup", lambda i=i: session.open_payload(i)) for i in ids}
    clients = {i: timed(client_ms, "setup", lambda i=i: SessionClient.open(
        setups[i], opened[i]["advertisements"], opened[i]["nonces"])) for i in ids}
    per_round_server, per_round_client = [], []
    for r in range(1, rounds + 1):
        updates = {i: rng.uniform(-0.1, 0.1, dimension).astype(np.float32) for i in ids}
        model = crypto.random_secret()  # stands for the round's model hash
        before_s, before_c = sum(server_ms.values()), sum(client_ms.values())
        timed(server_ms, "round", lambda r=r, m=model: session.start_round(r, m, ids))
        inputs = {i: timed(client_ms, "round", lambda i=i, r=r, m=model, up=updates: clients[i].masked_input(
            r, m, up[i], 10 + i % 90)) for i in ids}
        u3 = timed(server_ms, "round", lambda x=inputs: session.receive_masked_inputs(x))
        sigs = {i: timed(client_ms, "round", lambda i=i, r=r, u=u3: clients[i].consistency(r, u)) for i in u3}
        signers = timed(server_ms, "round", lambda x=sigs: session.receive_signatures(x))
        requests = {i: timed(server_ms, "round", lambda i=i: session.unmask_request(i)) for i in signers}
        reveals = {i: timed(client_ms, "round", lambda i=i, r=r, u=u3, q=requests: clients[i].unmask(
            r, u, *q[i])) for i in signers}
        timed(server_ms, "round", lambda x=reveals: (session.receive_unmask(x), session.aggregate()))
        per_round_server.append(round(sum(server_ms.values()) - before_s, 2))
        per_round_client.append((sum(client_ms.values()) - before_c) / nodes)
    setup_ms = server_ms["setup"]
    return {"setup_ms": round(setup_ms, 2), "round_ms": statistics.median(per_round_server),
            "round_ms_values": per_round_server,
            "setup_round_ms": round(setup_ms + per_round_server[0], 2),
            "client_setup_ms": round(client_ms["setup"] / nodes, 2),
            "client_round_ms": round(statistics.median(per_round_client), 2)}


def fit_growth(nodes: list[int], values: list[float], ks: list[int]) -> dict[str, Any]:
    """Least squares on log-log (``log y = a + b log n``: the exponent b), and which of
    c n, c n log2 n, c n k, c n^2 fits best (smallest RMS of the log residuals, c fitted)."""
    import numpy as np

    n, y, k = (np.asarray(v, dtype=float) for v in (nodes, values, ks))
    slope, intercept = np.polyfit(np.log(n), np.log(y), 1)
    models = {"n": n, "n log2 n": n * np.log2(n), "n k": n * k, "n^2": n**2}
    rms = {}
    for name, f in models.items():
        c = float(np.exp(np.mean(np.log(y) - np.log(f))))
        rms[name] = {"c": c, "rms_log_residual": float(np.sqrt(np.mean((np.log(y) - np.log(c * f)) ** 2)))}
    best = min(rms, key=lambda m: rms[m]["rms_log_residual"])
    return {"loglog_exponent": float(slope), "loglog_intercept": float(intercept),
            "models": rms, "best": best}


def run_core_vs_n(path: Path, nodes: tuple[int, ...] = COST_NODES,
                  dimension: int = COST_DIMENSION, k: int = COST_K,
                  rounds: int = COST_ROUNDS) -> dict[str, Any]:
    """The server core's CPU per round against n, both paths, fixed k and d; fits, table,
    JSON at ``path`` and the plot at :data:`COST_VS_N_PLOT`."""
    rows = []
    for n in nodes:
        k_n = min(k, n - 1)
        for multi in (True, False):
            Console().print(f"core cost: n = {n}, k = {k_n}, {'multi' if multi else 'per'}-round ...")
            started = time.monotonic()
            cost = (multi_round_cost(n, dimension, k_n, rounds) if multi
                    else per_round_cost(n, dimension, k_n, rounds if n < 1000 else 1))
            rows.append({"nodes": n, "k": k_n, "t": default_threshold(k_n, n), "dimension": dimension,
                         "path": "multi-round" if multi else "per-round",
                         "wall_s": round(time.monotonic() - started, 1), **cost})
    fits = {}
    for path_name in ("multi-round", "per-round"):
        sel = [r for r in rows if r["path"] == path_name]
        fits[path_name] = fit_growth([r["nodes"] for r in sel], [r["round_ms"] for r in sel],
                                     [r["k"] for r in sel])
        setups = [r for r in sel if r.get("setup_round_ms")]
        if setups and len(setups) == len(sel):
            fits[path_name + " set-up round"] = fit_growth([r["nodes"] for r in sel],
                                                           [r["setup_round_ms"] for r in sel],
                                                           [r["k"] for r in sel])
    table = Table(title=f"SecAgg+ server core, CPU ms per round against n (d = {dimension:.0e}, "
                        f"k = {k}, no dropouts)")
    for column in ("n", "k / t", "path", "server set-up ms", "server set-up round ms",
                   "server ms per round", "client set-up ms", "client ms per round", "rounds"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["nodes"]), f"{r['k']} / {r['t']}", r["path"],
                      _fmt(r["setup_ms"], ".1f"), _fmt(r.get("setup_round_ms"), ".1f"),
                      f"{r['round_ms']:.1f}", _fmt(r.get("client_setup_ms"), ".2f"),
                      _fmt(r.get("client_round_ms"), ".2f"), str(len(r["round_ms_values"])))
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)
    for name, fit in fits.items():
        Console().print(f"{name}: log-log exponent {fit['loglog_exponent']:.2f}; best model "
                        f"{fit['best']} (RMS log residuals: " + ", ".join(
                            f"{m} {v['rms_log_residual']:.3f}" for m, v in fit["models"].items()) + ")")
    data = {"meta": {"loadavg": [round(x, 2) for x in os.getloadavg()], "git_commit": _git_commit(),
                     "secagg_source_sha256": _secagg_source_digest(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "cpu": "time.process_time of the one benchmark process",
                     "dimension": dimension, "k": k, "rounds": rounds},
            "rows": rows, "fits": fits}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    plot_cost_vs_n(data, COST_VS_N_PLOT)
    return data


def plot_cost_vs_n(data: dict[str, Any], path: Path) -> None:
    """Log-log plot of the server's CPU per round (and the multi-round set-up) against n,
    with the fitted power laws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = [("per-round", "round_ms", "per-round path: every round", "o-"),
              ("multi-round", "round_ms", "multi-round path: a round after set-up", "s-"),
              ("multi-round", "setup_round_ms", "multi-round path: the set-up round", "^--")]
    for path_name, field, label, style in series:
        sel = [r for r in data["rows"] if r["path"] == path_name and r.get(field)]
        if not sel:
            continue
        n = np.array([r["nodes"] for r in sel], dtype=float)
        y = np.array([r[field] for r in sel], dtype=float)
        fit_key = path_name + (" set-up round" if field == "setup_round_ms" else "")
        exponent = data["fits"].get(fit_key, {}).get("loglog_exponent")
        suffix = f" (~n^{exponent:.2f})" if exponent is not None else ""
        ax.plot(n, y, style, label=label + suffix)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cohort size n (clients)")
    ax.set_ylabel("server CPU per round (ms)")
    meta = data["meta"]
    ax.set_title(f"SecAgg+ server core, d = {meta['dimension']:.0e}, k = {meta['k']}, no dropouts")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- issue 20: the round cost before and after the SecAgg+ hardening --------------------
ISSUE20_JSON = REPO / "benchmarks/results/secagg_issue20_cost.json"
ISSUE20_NODES = (20, 100)
ISSUE20_DIMENSION = 100_000
ISSUE20_TARGET = 1.10  # "after" may cost at most +10 % of "before"
ISSUE20_MULTI_REPS = 10  # at least this many session rounds (a few ms each at n = 20)


def issue20_cost(nodes: int, dimension: int, k: int, reps: int) -> dict[str, Any]:
    """One SecAgg+ round at ``nodes`` clients, both paths, in process (the protocol core,
    no Flower), no dropouts: server and per-client CPU ms per round, medians over
    ``reps`` rounds (multi-round: ``max(reps, ISSUE20_MULTI_REPS)`` rounds of one session
    after its set-up; per-round: ``reps`` whole protocols)."""
    started = time.monotonic()
    multi = multi_round_cost(nodes, dimension, k, max(reps, ISSUE20_MULTI_REPS))
    multi_wall = time.monotonic() - started
    started = time.monotonic()
    per = per_round_cost(nodes, dimension, k, reps)
    per_wall = time.monotonic() - started
    return {
        "multi-round": {"server_round_ms": multi["round_ms"], "server_round_ms_values": multi["round_ms_values"],
                        "client_round_ms": multi["client_round_ms"], "server_setup_ms": multi["setup_ms"],
                        "client_setup_ms": multi["client_setup_ms"], "wall_s": round(multi_wall, 1)},
        "per-round": {"server_round_ms": per["round_ms"], "server_round_ms_values": per["round_ms_values"],
                      "client_round_ms": per["client_round_ms"], "wall_s": round(per_wall, 1)},
    }


def run_issue20(path: Path, label: str, reps: int, dimension: int = ISSUE20_DIMENSION) -> dict[str, Any]:
    """The round cost at n = 20 and n = 100 (issue 20's "before and after", target at most
    +10 %), stored under ``label`` in ``path``; with both ``before`` and another label
    there, the ratios ``label / before`` are stored and printed too.

    Two graphs per n: ``default`` (k from :func:`default_num_shares` of this checkout, so
    a change of the defaults shows) and ``fixed`` (the k recorded by ``before``, so the
    implementation's own cost shows even if the defaults change)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    runs = data.setdefault("runs", {})
    before = runs.get("before", {})
    rows = []
    started = time.monotonic()
    for n in ISSUE20_NODES:
        graphs = {"default": min(default_num_shares(n), n - 1)}
        fixed = next((r["k"] for r in before.get("rows", []) if r["nodes"] == n and r["graph"] == "default"), None)
        graphs["fixed"] = fixed if fixed is not None else graphs["default"]
        measured: dict[int, dict[str, Any]] = {}
        for graph, k in graphs.items():
            if k not in measured:
                Console().print(f"issue 20 cost: n = {n}, d = {dimension:.0e}, k = {k} ({graph}) ...")
                measured[k] = issue20_cost(n, dimension, k, reps)
            rows.append({"nodes": n, "dimension": dimension, "graph": graph, "k": k,
                         "t": default_threshold(k, n), **measured[k]})
    runs[label] = {"git_commit": _git_commit(), "secagg_source_sha256": _secagg_source_digest(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "loadavg": [round(x, 2) for x in os.getloadavg()], "reps": reps,
                   "argv": sys.argv[1:], "wall_s": round(time.monotonic() - started, 1),
                   "rows": rows}
    data["meta"] = {
        "what": "SecAgg+ round cost in process (protocol core, no Flower, no dropouts): CPU ms "
                "(time.process_time of the benchmark process) per round of the server and of one "
                "client, median over the reps; multi-round = a round of a session after its key "
                "set-up, per-round = the whole protocol",
        "command": "python benchmarks/secagg.py --issue20 --label LABEL",
        "target": f"after / before <= {ISSUE20_TARGET} for every row (issue 20)",
    }
    if "before" in runs and label != "before":
        data.setdefault("ratios", {})[label] = issue20_ratios(runs["before"], runs[label])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print_issue20(data)
    return data


def issue20_ratios(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """``after / before`` per (n, graph, path) of the server's and a client's CPU per round."""
    out = []
    old = {(r["nodes"], r["graph"]): r for r in before["rows"]}
    for row in after["rows"]:
        ref = old.get((row["nodes"], row["graph"]))
        if ref is None:
            continue
        for path_name in ("multi-round", "per-round"):
            server = _ratio(row[path_name]["server_round_ms"], ref[path_name]["server_round_ms"])
            client = _ratio(row[path_name]["client_round_ms"], ref[path_name]["client_round_ms"])
            out.append({"nodes": row["nodes"], "graph": row["graph"], "path": path_name,
                        "k_before": ref["k"], "k_after": row["k"],
                        "server_ratio": server, "client_ratio": client,
                        "within_target": all(r is not None and r <= ISSUE20_TARGET
                                             for r in (server, client))})
    return out


def print_issue20(data: dict[str, Any]) -> None:
    table = Table(title="SecAgg+ round cost (issue 20), CPU ms per round, no dropouts")
    for column in ("label", "n", "graph", "k / t", "path", "server ms", "client ms", "set-up ms"):
        table.add_column(column, justify="right")
    for label, run in data["runs"].items():
        for row in run["rows"]:
            for path_name in ("multi-round", "per-round"):
                cell = row[path_name]
                table.add_row(label, str(row["nodes"]), row["graph"], f"{row['k']} / {row['t']}",
                              path_name, f"{cell['server_round_ms']:.1f}",
                              f"{cell['client_round_ms']:.1f}",
                              _fmt(cell.get("server_setup_ms"), ".1f"))
    Console(width=max(140, shutil.get_terminal_size().columns)).print(table)
    for label, ratios in data.get("ratios", {}).items():
        for r in ratios:
            Console().print(f"{label}/before n={r['nodes']} {r['graph']} {r['path']}: server "
                            f"{_fmt(r['server_ratio'], '.3f')}, client {_fmt(r['client_ratio'], '.3f')}"
                            f" ({'within' if r['within_target'] else 'OVER'} the +10 % target)")


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
    parser.add_argument("--suite", choices=["issue14", "matrix"], default="issue14",
                        help="issue14 (default): n = 20 / d = 1e6 (FedAvg, flwr-guard multi-round "
                             "and per-round), n = 100 / d = 1e5 (+ Flower, k = 4), n = 1000 "
                             "virtual clients / d = 1e4 with cohorts of 100 and distributed DP, "
                             "then the core's cost against n (--core-vs-n); matrix: --nodes x "
                             "--dims x --graphs as before (flwr-guard on --paths)")
    parser.add_argument("--paths", nargs="+", default=["multi-round"],
                        choices=["multi-round", "per-round"], help="matrix suite: flwr-guard paths")
    parser.add_argument("--scale-rounds", type=int, default=2,
                        help="issue14 suite: rounds of the n = 1000 runs")
    parser.add_argument("--no-core-vs-n", action="store_true",
                        help="issue14 suite: skip the core's cost against n")
    parser.add_argument("--core-vs-n", action="store_true",
                        help="run only the core's server cost against n (no Flower): n in "
                             "{20, 100, 1000}, both paths; JSON, table and docs/img plot")
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 10, 5])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--graphs", nargs="+", default=["sparse", "default"],
                        help="sparse (k = 4), default (the cohort's default k), or k=<int>")
    parser.add_argument("--drop-nodes", type=int, nargs="*", default=[20],
                        help="cohort sizes that also get a case with --drop-count dropouts")
    parser.add_argument("--drop-count", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already complete in --out, run the others")
    parser.add_argument("--rerun", nargs="*", default=[], metavar="CASE",
                        help="with --resume: run these cases again (e.g. n20-d1000000-drop0); "
                             "their earlier runs move to `superseded_runs` in the JSON")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default benchmarks/results/secagg_issue14.json for the "
                             "issue14 suite, benchmarks/results/secagg.json for matrix and --core)")
    parser.add_argument("--core", action="store_true",
                        help="run only the protocol core (no Flower), n = 20, d in {1e5, 1e6}, "
                             "k in {4, 14}; store under `core_profile` (an earlier one moves to "
                             "`superseded_core_profiles`)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print the table of --out, and its markdown")
    parser.add_argument("--issue20", action="store_true",
                        help="run only issue 20's round cost in process (n = 20 and 100, both "
                             "paths, d = 1e5): benchmarks/results/secagg_issue20_cost.json under "
                             "--label, with the ratios to the label 'before'")
    parser.add_argument("--label", default="before",
                        help="--issue20: the label of this measurement (before, after, ...)")
    parser.add_argument("--reps", type=int, default=3,
                        help="--issue20: rounds measured per configuration (median)")
    args = parser.parse_args()
    if args.issue20:
        run_issue20(ISSUE20_JSON, args.label, args.reps)
        return
    if args.out is None:
        name = "secagg_issue14.json" if args.suite == "issue14" and not args.core else "secagg.json"
        args.out = REPO / "benchmarks/results" / name
    if args.core_vs_n:
        run_core_vs_n(COST_VS_N_JSON)
        return
    if args.core:
        run_core(args.out)
        return
    if args.report:
        saved = json.loads(args.out.read_text())["runs"]
        add_ratios(saved)
        print_table(saved)
        print(markdown_table(saved))
        print(memory_table(saved))
        return
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    cases: list[list[RunSpec]] = []
    paths = tuple(p == "multi-round" for p in args.paths)
    if args.suite == "issue14":
        cases = issue14_cases(args.rounds, args.scale_rounds)
    else:
        for nodes in args.nodes:
            for dimension in args.dims:
                cases.append(case_specs(nodes, dimension, args.graphs, (), paths))
                if nodes in args.drop_nodes:
                    # spread over the partition ids: partitions n/4 and 3n/4
                    drop = tuple(sorted({(i * 2 + 1) * nodes // (2 * args.drop_count)
                                         for i in range(args.drop_count)}))
                    cases.append(case_specs(nodes, dimension, args.graphs, drop, paths))

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
    elif args.out.exists():  # a fresh pass: the earlier runs stay, as superseded
        saved = json.loads(args.out.read_text())
        superseded = saved.get("superseded_runs", []) + [
            {**run, "note": run.get("note") or "earlier pass (a later one ran without --resume)"}
            for run in saved.get("runs", [])]
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
    print(markdown_table(kept + runs))
    print(memory_table(kept + runs))
    _write(args.out, meta, kept + runs, superseded)
    if args.suite == "issue14" and not args.no_core_vs_n:
        run_core_vs_n(COST_VS_N_JSON)


def _write(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]],
           superseded: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}  # keeps `core_profile`
    data.update({"meta": meta, "runs": runs, "superseded_runs": superseded})
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
