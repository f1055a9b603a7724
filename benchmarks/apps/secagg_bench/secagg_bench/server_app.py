"""ServerApp of the four variants; writes its measurements to the run config's ``out-file``.

Each round is timed from the strategy's ``configure_train`` to the end of its
``aggregate_train`` (Message API), or around one call of the fit workflow (legacy
path), so both include every SecAgg+ stage. After each round, outside the timed
window, the new global model is checked against the exact weighted average of the
survivors' updates (not for ``guard-dp``, whose aggregate holds the clients' noise and
clipped updates: there the record holds the standard deviation of the aggregate's
change instead).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_guard.guard import DistributedDP, GuardedStrategy, SecAgg
from flwr_guard.secagg.params import default_num_shares, default_threshold
from flwr_guard.secagg.strategy import SecAggPlus
from flwr_guard.strategy_wrapper import StrategyWrapper
from secagg_bench.measure import UPDATE_STAGE, MeasuringGrid
from secagg_bench.task import expected_average, initial_model

logger = logging.getLogger(__name__)
app = ServerApp()

MAX_WEIGHT = 1000  # Flower's default max_weight; used for both SecAgg+ implementations
GUARD_CLIPPING_RANGE = 1.0  # updates lie in [-0.1, 0.1]
TIMEOUT_S = 600.0
# Ray starts one ClientApp actor per 2 CPUs (Flower's default client resources): on this
# 2-core machine one. The warm-up query reaches this many nodes, enough to start them all.
WARM_UP_NODES = 4


def warm_up(grid: Grid, nodes: int) -> float:
    """Before round 1: wait until ``nodes`` nodes are connected, then send one empty query
    to a few of them, so that Ray's actors start (and import the ClientApp) outside the
    timed rounds. Round 1 then holds only what the protocol does in its first round
    (flwr-guard's multi-round path: the key set-up). Returns the seconds it took."""
    import time

    started = time.perf_counter()
    while len(ids := sorted(grid.get_node_ids())) < nodes:
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
                for node in ids[:WARM_UP_NODES]]
    replies = list(grid.send_and_receive(messages, timeout=TIMEOUT_S))
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) != len(messages):
        raise RuntimeError(f"warm-up query failed: {len(replies)} replies, {len(failed)} errors: "
                           + "; ".join(str(r.error.reason) for r in failed[:3]))
    return time.perf_counter() - started


class _RoundClock(StrategyWrapper):
    """Outermost wrapper: opens/closes the measured round around train."""

    def __init__(self, strategy, grid: MeasuringGrid) -> None:  # type: ignore[no-untyped-def]
        super().__init__(strategy)
        self.grid = grid
        self.models: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._before: np.ndarray | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.grid.begin_round(server_round)
        self._before = arrays.to_numpy_ndarrays()[0]
        return list(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.grid.end_round(completed=arrays is not None)
        after = None if arrays is None else arrays.to_numpy_ndarrays()[0]
        self.models[server_round] = (self._before, after)
        return arrays, metrics


class _RecordingLegacyFedAvg(LegacyFedAvg):
    """Legacy FedAvg that remembers which rounds reached ``aggregate_fit``."""

    aggregated_rounds: set[int]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        self.aggregated_rounds.add(server_round)
        return super().aggregate_fit(server_round, results, failures)


def _graph(cfg: dict[str, Any], nodes: int) -> tuple[int, int]:
    """(k, t): neighbours per client without itself, and the reconstruction threshold."""
    k = int(cfg["num-shares"]) or default_num_shares(nodes)
    k = min(k, nodes - 1)
    t = int(cfg["reconstruction-threshold"]) or default_threshold(k, nodes)
    return k, t


def cohort_size(cfg: dict[str, Any], nodes: int) -> int:
    """Clients sampled per round: FedAvg's ``int(fraction_train * nodes)``."""
    return max(int(float(cfg["fraction-train"]) * nodes), 2)


def _multi_round_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"multi_round": ...}`` for SecAggPlus; refuses a run that asks for the multi-round
    path from a flwr-guard that does not have it (no silent per-round run)."""
    multi = bool(cfg["multi-round"])
    if "multi_round" in inspect.signature(SecAggPlus.__init__).parameters:
        return {"multi_round": multi}
    if multi:
        raise ValueError("run config multi-round = true, but this flwr-guard's SecAggPlus has "
                         "no multi_round option: run with multi-round = false")
    return {}


def _run_message_api(grid: MeasuringGrid, cfg: dict[str, Any], nodes: int, k: int, t: int):
    cohort = cohort_size(cfg, nodes)
    common = dict(
        fraction_train=float(cfg["fraction-train"]), fraction_evaluate=0.0,
        min_train_nodes=cohort, min_available_nodes=nodes,
    )
    strategy: Any = FedAvg(**common)
    if cfg["variant"] == "guard-dp":
        m = int(cfg["dp-min-contributors"]) or cohort // 2
        guarded = GuardedStrategy(
            strategy,
            secagg=SecAgg(num_shares=int(cfg["num-shares"]) or None,
                          reconstruction_threshold=int(cfg["reconstruction-threshold"]) or None,
                          clipping_range=GUARD_CLIPPING_RANGE, timeout=TIMEOUT_S,
                          **_multi_round_kwargs(cfg)),
            dp=DistributedDP(noise_multiplier=float(cfg["dp-noise-multiplier"]),
                             clipping_norm=float(cfg["dp-clipping-norm"]),
                             expected_contributors=cohort, min_contributors=m,
                             options={"checkpoint": None}),
            audit_summary=False,
        )
        # The clock goes around the chain GuardedStrategy built (its start() is the loop).
        clock = _RoundClock(guarded.strategy, grid)
        guarded.strategy = clock
        initial = ArrayRecord(numpy_ndarrays=[initial_model(int(cfg["dimension"]))])
        guarded.start(grid, initial, num_rounds=int(cfg["num-server-rounds"]), timeout=TIMEOUT_S)
        history = [r.to_dict() for r in guarded.secagg.history]
        # What the clients' Skellam noise should give per coordinate of the aggregate's
        # change (docs/privacy.md): sqrt(n / m) z D step / n, D = C / step + sqrt(d), for n
        # survivors (the clipped updates' own mean adds ~C / (sqrt(d) sqrt(n)), far less).
        step = 2 * GUARD_CLIPPING_RANGE / 2**16
        z, clip, d = float(cfg["dp-noise-multiplier"]), float(cfg["dp-clipping-norm"]), int(cfg["dimension"])
        expected_std = (cohort / m) ** 0.5 * z * (clip / step + d**0.5) * step / cohort
        extra = {"dp_epsilon": guarded.dp.epsilon, "dp_min_contributors": m, "cohort": cohort,
                 "dp_expected_update_std": expected_std}
        return clock.models, history, extra
    if cfg["variant"] == "guard":
        poll_max = os.environ.get("SECAGG_BENCH_POLL_MAX_S")  # what-if only (docs/secagg.md)
        if poll_max:
            import functools

            import flwr_guard.secagg.strategy as guard_strategy
            from flwr_guard.secagg.transport import send_and_receive

            guard_strategy.send_and_receive = functools.partial(
                send_and_receive, max_interval_s=float(poll_max))
        strategy = SecAggPlus(
            strategy,
            num_shares=k,
            reconstruction_threshold=t,
            clipping_range=GUARD_CLIPPING_RANGE,
            max_weight=MAX_WEIGHT,
            timeout=TIMEOUT_S,
            **_multi_round_kwargs(cfg),
        )
    clock = _RoundClock(strategy, grid)
    initial = ArrayRecord(numpy_ndarrays=[initial_model(int(cfg["dimension"]))])
    clock.start(grid, initial, num_rounds=int(cfg["num-server-rounds"]), timeout=TIMEOUT_S)
    history = [r.to_dict() for r in strategy.history] if cfg["variant"] == "guard" else []
    return clock.models, history, {"cohort": cohort}


def _run_flower_legacy(grid: MeasuringGrid, context: Context, cfg: dict[str, Any], nodes: int, k: int, t: int):
    strategy = _RecordingLegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([initial_model(int(cfg["dimension"]))]),
        on_fit_config_fn=lambda r: {"server-round": r},
    )
    strategy.aggregated_rounds = set()
    # Flower counts the client itself in its neighbourhood of num_shares clients.
    secagg = SecAggPlusWorkflow(
        num_shares=k + 1 if k + 1 < nodes else nodes,
        reconstruction_threshold=t,
        max_weight=float(MAX_WEIGHT),
        timeout=TIMEOUT_S,
    )
    models: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def timed_fit(g: Grid, ctx: LegacyContext) -> None:
        current = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        before = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0]
        grid.begin_round(current)
        secagg(g, ctx)
        grid.end_round(completed=current in strategy.aggregated_rounds)
        after = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0]
        models[current] = (before, after if current in strategy.aggregated_rounds else None)

    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)
    return models, [], {"cohort": nodes}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    nodes, dimension, variant = int(cfg["min-nodes"]), int(cfg["dimension"]), str(cfg["variant"])
    k, t = _graph(cfg, cohort_size(cfg, nodes))
    warm_up_s = warm_up(grid, nodes)
    measuring = MeasuringGrid(grid)
    if variant in ("fedavg", "guard", "guard-dp"):
        models, history, extra = _run_message_api(measuring, cfg, nodes, k, t)
    elif variant == "flower":
        models, history, extra = _run_flower_legacy(measuring, context, cfg, nodes, k, t)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    # Correctness, outside the timed windows: new global - old global against the
    # exact weighted average of the survivors' updates.
    for rec in measuring.rounds:
        before, after = models.get(rec["round"], (None, None))
        survivors = next(
            (s["ok"] for s in rec["stages"] if s["stage"] == UPDATE_STAGE[variant]), []
        )
        rec["survivors"] = len(survivors) if rec["completed"] else 0
        rec["update_std"] = None
        if after is not None and variant == "guard-dp":
            rec["update_std"] = float((after.astype(np.float64) - before).std())
            rec["max_abs_error"] = None
        elif after is not None and survivors:
            expected = expected_average(survivors, rec["round"], dimension)
            rec["max_abs_error"] = float(np.abs(after.astype(np.float64) - before - expected).max())
        else:
            rec["max_abs_error"] = None
    out = {
        "variant": variant,
        "nodes": nodes,
        "dimension": dimension,
        "num_rounds": int(cfg["num-server-rounds"]),
        "neighbours_k": k if variant != "fedavg" else None,
        "reconstruction_threshold": t if variant != "fedavg" else None,
        "flower_num_shares": (k + 1 if k + 1 < nodes else nodes) if variant == "flower" else None,
        "drop_partitions": str(cfg["drop-partitions"]),
        "drop_stage": str(cfg["drop-stage"]),
        "max_weight": MAX_WEIGHT,
        "python": platform.python_version(),
        "pid": os.getpid(),
        "rounds": [
            {**r, "bytes_down": {str(n): b for n, b in r["bytes_down"].items()},
             "bytes_up": {str(n): b for n, b in r["bytes_up"].items()},
             "stages": [{**s, "bytes_down": {str(n): b for n, b in s["bytes_down"].items()},
                         "bytes_up": {str(n): b for n, b in s["bytes_up"].items()}}
                        for s in r["stages"]]}
            for r in measuring.rounds
        ],
        "guard_history": history,
        "multi_round": bool(cfg["multi-round"]),
        "warm_up_s": warm_up_s,
        "fraction_train": float(cfg["fraction-train"]),
        **extra,
    }
    path = Path(str(cfg["out-file"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n", encoding="utf-8")
    progress = str(cfg.get("progress-file", ""))
    if progress:
        with open(progress, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": "finished"}) + "\n")
