"""Audit seconds per round on a tabular app and on the digits CNN, as a share of the round.

Both apps run real rounds through Flower's ClientApp, the guard's mods and SecAgg+
(GuardedStrategy(FedAvg, SecAgg) over 4 in-process clients, tests/guard_harness.py;
clients answer one after the other, so every time below is the sum over the 4 clients,
and every ratio is the same as for clients running in parallel):

- tabular: the wine data (13 features, dict batches ``{"x", "y"}``), an MLP 13-32-3,
  5 local epochs of SGD (batch 16);
- digits CNN: the reference model on 8x8 digits, 450 images per client, 1 epoch (batch 32).

Per app: a warm-up run (discarded: imports, SecAgg+ key set-up), then ``--rounds``
rounds without an audit (``a``: seconds per round for the 4 clients, i.e. ``a / 4`` per
client) and ``--rounds`` rounds with the audit on every client in every round, whose
``audit-seconds`` (measured inside the mod) give the time of one audit ``t``. The
always-on part of a configured audit — the pre-flight (first message only) and the
trap-model check on every message — is timed directly on the same model and data
(``k``, median of 20). With clients in parallel, a round's expected overhead for a
sampling with P(round audited) ``p`` is ``k + p · t``, and its share of the round
``(k + p · t) / (a / 4)``; ``p`` for the library default (``AuditSampling()``: 10 % of
rounds, half the clients) is ``0.1 · (1 − 0.5⁴) = 0.094``. ``a / 4`` is the
compute-bound floor of a round (one client's training, in-process); a deployment round
also waits for SecAgg+'s stages, polling and process start-up, so the share is also
given against ``deployment-round-s`` of benchmarks/results/audit.json (the measured
local-deployment round of benchmarks/audit.py) when present. The largest budget that
keeps the expected share under 10 % of the compute floor is ``(0.1 · a / 4 − k) / p``.

Usage: python benchmarks/audit_overhead.py [--rounds 5] [--budget 2.0] [--effort 0.3]
       [--out benchmarks/results/audit_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from sklearn.datasets import load_digits, load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

from flwr_guard.audit import AuditPlan, AuditSampling, LeakageAuditConfig, LocalTraining, Protections
from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard, LeakageAudit
from flwr_guard.guard.strategy import GuardedStrategy, SecAgg
from flwr_guard.models.digits_cnn import DigitsCNN

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from guard_harness import LoopbackGrid

NODES = (11, 12, 13, 14)


def _apps() -> dict[str, dict]:
    x, y = load_wine(return_X_y=True)
    wx, wy = torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(wx), generator=torch.Generator().manual_seed(0))
    d = load_digits()
    dx = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    dy = torch.tensor(d.target)
    return {
        "tabular (wine MLP)": {
            "model": lambda: nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3)),
            "data": lambda n: {"x": wx[perm[(n - 11) * 44:(n - 10) * 44]],
                               "y": wy[perm[(n - 11) * 44:(n - 10) * 44]]},
            "epochs": 5, "batch": 16,
        },
        "digits CNN": {
            "model": DigitsCNN,
            "data": lambda n: {"x": dx[(n - 11) * 450:(n - 10) * 450],
                               "y": dy[(n - 11) * 450:(n - 10) * 450]},
            "epochs": 1, "batch": 32,
        },
    }


def _train_fn(app: dict):
    def train(msg: Message, context) -> Message:
        model = app["model"]()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = app["data"](context.node_id)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(app["epochs"]):
            for i in range(0, len(data["x"]), app["batch"]):
                opt.zero_grad()
                nn.functional.cross_entropy(model(data["x"][i:i + app["batch"]]),
                                            data["y"][i:i + app["batch"]]).backward()
                opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(data["x"])})}),
                       reply_to=msg)
    return train


def _round_seconds(app: dict, sampling: AuditSampling | None, rounds: int, budget: float,
                   effort: float) -> tuple[float, list[float]]:
    audit = None
    if sampling is not None:
        plan = AuditPlan(training=LocalTraining(1, 0.1), protections=Protections(aggregate_size=4),
                         effort=effort, time_budget_s=budget)
        audit = LeakageAudit(app["model"], lambda ctx: app["data"](ctx.node_id),
                             config=LeakageAuditConfig(plan=plan, sampling=sampling, device="cpu"))
    guard = ClientGuard(ClientPolicy(secagg=True), audit=audit)
    apps = {}
    for n in NODES:
        client = ClientApp()
        client.train(mods=guard.train_mods())(_train_fn(app))
        apps[n] = client
    grid = LoopbackGrid(apps)
    torch.manual_seed(0)
    strategy = GuardedStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=4,
                                      min_available_nodes=4), secagg=SecAgg(timeout=30))
    started = time.perf_counter()
    strategy.start(grid, ArrayRecord(app["model"]().state_dict()), num_rounds=rounds)
    seconds = (time.perf_counter() - started) / rounds
    audit_s = [float(r.content["metrics"]["audit-seconds"]) for r in grid.received
               if not r.has_error() and "metrics" in r.content.metric_records
               and r.content["metrics"].get("audit-ran")]
    return seconds, audit_s


def _always_on_seconds(app: dict) -> float:
    """Median seconds of the trap-model check's work on one message (model load, data,
    check), the part of a configured audit that runs every round."""
    from flwr_guard.audit.inputs import as_pair, prepare
    from flwr_guard.audit.trap_check import check_model

    record = ArrayRecord(app["model"]().state_dict())
    times = []
    for _ in range(20):
        started = time.perf_counter()
        model = app["model"]()
        model.load_state_dict(record.to_torch_state_dict())
        data = prepare(*as_pair(app["data"](11)))
        check_model(model, data)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=2.0, help="audit time budget, s")
    parser.add_argument("--effort", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/audit_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deployment = None
    previous = ROOT / "benchmarks/results/audit.json"
    if previous.exists():
        overhead = json.loads(previous.read_text()).get("overhead") or [{}]
        deployment = overhead[0].get("deployment-round-s")
    default = AuditSampling()
    p = default.round_fraction * (1 - (1 - default.client_fraction) ** len(NODES))
    rows = []
    for name, app in _apps().items():
        _round_seconds(app, None, 1, args.budget, args.effort)  # warm-up
        a, _ = _round_seconds(app, None, args.rounds, args.budget, args.effort)
        _, audits = _round_seconds(app, AuditSampling(1.0, 1.0), args.rounds, args.budget,
                                   args.effort)
        k = _always_on_seconds(app)
        t = statistics.median(audits)
        floor = a / len(NODES)
        row = {
            "app": name, "rounds": args.rounds, "clients": len(NODES),
            "audit-budget-s": args.budget, "effort": args.effort,
            "round-s-per-client (compute floor)": round(floor, 4),
            "always-on-s (trap check, every round)": round(k, 4),
            "audit-s (one client, median)": round(t, 3),
            "p-round-audited-default": round(p, 4),
            "expected-overhead-s-per-round": round(k + p * t, 4),
            "share-always-on": round(k / floor, 4),
            "share-default-sampling": round((k + p * t) / floor, 4),
            "share-audited-round": round((k + t) / floor, 3),
            "budget-for-10pct-of-floor-s": round(max(0.1 * floor - k, 0.0) / p, 3),
        }
        if deployment:
            row["deployment-round-s"] = deployment
            row["share-default-sampling-vs-deployment-round"] = round((k + p * t) / deployment, 5)
            row["share-audited-round-vs-deployment-round"] = round((k + t) / deployment, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
