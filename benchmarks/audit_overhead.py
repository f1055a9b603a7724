"""Audit seconds per round on a tabular app and on the digits CNN, as a share of the round.

Both apps run real rounds through Flower's ClientApp, the guard's mods and SecAgg+
(GuardedStrategy(FedAvg, SecAgg) over 4 in-process clients, tests/guard_harness.py;
clients answer one after the other, so every time below is the sum over the 4 clients,
and every ratio is the same as for clients running in parallel):

- tabular: the wine data (13 features, dict batches ``{"x", "y"}``), an MLP 13-32-3,
  5 local epochs of SGD (batch 16);
- digits CNN: the reference model on 8x8 digits, 450 images per client, 1 epoch (batch 32).

Three configurations, ``--rounds`` rounds each: no audit (``a``); the audit configured
but never sampled (``b``: the always-on parts, pre-flight and trap-model check);
the audit on every client in every round (``c``). The expected share of a round for
a sampling with P(round audited) ``p`` is ``((b − a) + p · (c − b)) / a``; ``p`` for
the library default (``AuditSampling()``: 10 % of rounds, half the clients) is
``0.1 · (1 − 0.5⁴)``. ``a`` here is the compute-bound floor of a round; a deployment
round also waits for polling and process start-up (seconds, docs/design), so the share
there is smaller: it is given against ``deployment-round-s`` of
benchmarks/results/audit.json when present.

Usage: python benchmarks/audit_overhead.py [--rounds 3] [--budget 2.0] [--effort 0.3]
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
from guard_harness import LoopbackGrid  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
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
    p_default = default.round_fraction * (1 - (1 - default.client_fraction) ** len(NODES))
    rows = []
    for name, app in _apps().items():
        a, _ = _round_seconds(app, None, args.rounds, args.budget, args.effort)
        b, _ = _round_seconds(app, AuditSampling(0.0, 0.0), args.rounds, args.budget, args.effort)
        c, audits = _round_seconds(app, AuditSampling(1.0, 1.0), args.rounds, args.budget,
                                   args.effort)
        always, per_audit = max(b - a, 0.0), max(c - b, 0.0)
        row = {
            "app": name, "rounds": args.rounds, "clients": len(NODES),
            "round-s-no-audit": round(a, 3),
            "always-on-s (pre-flight + trap check)": round(always, 3),
            "audit-every-round-s": round(per_audit, 3),
            "audit-seconds-median (one client)": round(statistics.median(audits), 3) if audits else None,
            "share-always-on": round(always / a, 4),
            "share-every-round": round((always + per_audit) / a, 4),
            "p-round-audited-default": round(p_default, 4),
            "share-default-sampling": round((always + p_default * per_audit) / a, 4),
        }
        if deployment:
            # per client: a deployment round of `deployment` s; costs divided by the clients
            per_client = (always + p_default * per_audit) / len(NODES)
            row["deployment-round-s"] = deployment
            row["share-default-sampling-vs-deployment-round"] = round(per_client / deployment, 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"budget-s": args.budget, "effort": args.effort, "rows": rows},
                                   indent=2))


if __name__ == "__main__":
    main()
