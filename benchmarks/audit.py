"""Cost of the leakage audit: time per attack, per audit, and overhead per round.

1. Time per attack: each attack alone on one unprotected update (batch size 1), on the
   reference app's DigitsCNN at 8x8 and on DLG's sigmoid LeNet at 28x28, without a time
   budget (effort as given).
2. Time per audit: what the audit mod does by default (``LeakageAuditConfig()``: the
   default attacks at effort 0.5, 10 s budget) on the reference model, protections
   none and clipping + DP noise.
3. Overhead per round at the default sampling: clients of a sampled round audit in
   parallel (each on its own device), so a round costs one audit time more with
   probability P(round sampled and at least one of its N clients sampled); the expected
   overhead is that probability times the audit time. It is compared with the round time
   of the local deployment measured by benchmarks/demo.py (benchmarks/results/demo.json,
   if present) and with the compute-only round time (one client's local training on its
   digits partition, the floor of any round).

Usage: python benchmarks/audit.py [--device cpu|cuda|auto] [--effort 0.5] [--repeats 2]
       [--nodes 4] [--out benchmarks/results/audit.json]
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.apps.digits.training import train_epochs
from flwr_guard.audit import AuditPlan, LocalTraining, Protections, run_audit
from flwr_guard.audit.audit_mod import LeakageAuditConfig
from flwr_guard.audit.data import client_pool
from flwr_guard.audit.suite import ATTACKS
from flwr_guard.audit.sweep import MODELS

RESULTS = Path(__file__).parent / "results"


def time_attacks(device: str, effort: float, repeats: int) -> list[dict]:
    rows = []
    for model_name, size in (("digits-cnn", 8), ("lenet", 28)):
        images, labels = client_pool(size, 300, seed=0)
        model = MODELS[model_name](size, 0)
        for attack in ATTACKS:
            steps = 3 if attack == "ig-fedavg" else 1
            plan = AuditPlan(training=LocalTraining(steps, 1.0 if steps == 1 else 0.1),
                             attacks=(attack,), effort=effort, time_budget_s=None)
            seconds, iterations, psnr = [], [], []
            for seed in range(repeats):
                report = run_audit(model, images, labels, plan, seed=seed, device=device)
                run = report.attacks[0]
                seconds.append(run.seconds)
                iterations.append(run.iterations)
                psnr.append(run.scores.mean_psnr_db)
            rows.append({
                "model": model_name, "image": size, "attack": attack,
                "seconds": round(statistics.mean(seconds), 3),
                "iterations": round(statistics.mean(iterations), 1),
                "ms-per-iteration": round(1000 * sum(seconds) / max(sum(iterations), 1), 2),
                "psnr-db": round(statistics.mean(psnr), 2),
            })
    return rows


def time_audits(device: str, repeats: int) -> list[dict]:
    images, labels = client_pool(8, 300, seed=0)
    model = DigitsCNN()
    default = LeakageAuditConfig().plan
    rows = []
    for name, protections in (("none", Protections()),
                              ("clip + DP z=0.1", Protections(1.0, 0.1))):
        plan = AuditPlan(batch_size=default.batch_size, training=default.training,
                         protections=protections, attacks=default.attacks,
                         effort=default.effort, time_budget_s=default.time_budget_s)
        seconds, leaks = [], []
        for seed in range(repeats):
            report = run_audit(model, images, labels, plan, seed=seed, device=device)
            seconds.append(report.seconds)
            leaks.append(report.leaks)
        rows.append({"protections": name, "seconds": round(statistics.mean(seconds), 3),
                     "max-seconds": round(max(seconds), 3), "leaks": sum(leaks),
                     "audits": repeats, "budget-s": default.time_budget_s})
    return rows


def local_training_seconds(repeats: int) -> float:
    """One client's local epoch of the reference app (1/4 of the digits pool, batch 32)."""
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = client_pool(8, 1437 // 4, seed=1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    times = []
    for _ in range(repeats):
        model = DigitsCNN()
        start = time.monotonic()
        train_epochs(model, loader, 1, 0.05, 0.9, torch.device("cpu"))
        times.append(time.monotonic() - start)
    return statistics.mean(times)


def overhead(audit_s: float, nodes: int, training_s: float) -> dict:
    sampling = LeakageAuditConfig().sampling
    p_round = sampling.round_fraction * (1 - (1 - sampling.client_fraction) ** nodes)
    draws = [any(sampling.sampled(r, n) for n in range(nodes)) for r in range(20_000)]
    out = {
        "round-fraction": sampling.round_fraction,
        "client-fraction": sampling.client_fraction,
        "nodes": nodes,
        "p-round-audited": round(p_round, 4),
        "p-round-audited-measured": round(sum(draws) / len(draws), 4),
        "audit-s": round(audit_s, 3),
        "expected-overhead-s-per-round": round(p_round * audit_s, 3),
        "compute-only-round-s": round(training_s, 3),
        "overhead-vs-compute-only": round(p_round * audit_s / training_s, 3),
    }
    demo = RESULTS / "demo.json"
    if demo.exists():
        rows = [r for r in json.loads(demo.read_text())["results"] if r["nodes"] == nodes]
        if rows:
            round_s = rows[0]["later_rounds_mean_s"]
            out["deployment-round-s"] = round(round_s, 2)
            out["overhead-vs-deployment-round"] = round(p_round * audit_s / round_s, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--effort", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "audit.json")
    args = parser.parse_args()
    console = Console()
    started = time.monotonic()
    attacks = time_attacks(args.device, args.effort, args.repeats)
    table = Table(title=f"time per attack ({args.device}, effort {args.effort}, batch size 1, no defence)")
    for col in ("model", "image", "attack", "seconds", "iterations", "ms/iteration", "PSNR (dB)"):
        table.add_column(col, justify="right")
    for r in attacks:
        table.add_row(r["model"], f"{r['image']}px", r["attack"], f"{r['seconds']:.2f}",
                      f"{r['iterations']:.0f}", f"{r['ms-per-iteration']:.1f}", f"{r['psnr-db']:.1f}")
    console.print(table)
    audits = time_audits(args.device, args.repeats)
    table = Table(title="time per audit (audit mod defaults, DigitsCNN 8x8)")
    for col in ("protections", "mean s", "max s", "budget s", "leaks"):
        table.add_column(col, justify="right")
    for r in audits:
        table.add_row(r["protections"], f"{r['seconds']:.2f}", f"{r['max-seconds']:.2f}",
                      f"{r['budget-s']:g}", f"{r['leaks']}/{r['audits']}")
    console.print(table)
    training_s = local_training_seconds(args.repeats + 1)
    audit_s = max(r["max-seconds"] for r in audits)
    over = overhead(audit_s, args.nodes, training_s)
    table = Table(title="audit overhead per round at the default sampling")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in over.items():
        table.add_row(key, str(value))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": args.device,
                    "platform": platform.platform()},
        "effort": args.effort, "repeats": args.repeats,
        "attacks": attacks, "audits": audits, "overhead": over,
        "seconds": round(time.monotonic() - started, 1),
    }, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
