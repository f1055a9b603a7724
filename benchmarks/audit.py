"""Cost of the leakage audit: time per attack, per audit, and overhead per round.

1. Time per attack: each attack alone on one unprotected update (batch size 1), on the
   reference app's DigitsCNN at 8x8 and on DLG's sigmoid LeNet at 28x28, without a time
   budget (effort as given).
2. Time per audit: what the audit mod does by default (``LeakageAuditConfig()``: the
   default attacks at effort 0.5, 10 s budget) on the reference model, protections
   none and clipping + DP noise.
   Also the reference app's own plan (apps/digits/leakage_audit.py: DP-SGD probe step
   and the SecAgg+ cohort of ``min-nodes``, budget ``audit-time-budget``).
3. Overhead per round, for two samplings: the library default (``AuditSampling()``)
   and the reference app's run config (apps/digits/pyproject.toml:
   ``audit-round-fraction``, ``audit-client-fraction``). Clients of a sampled round
   audit in parallel (each on its own device), so a round costs one audit time more with
   probability P(round sampled and at least one of its N clients sampled); the expected
   overhead is that probability times the audit time. It is compared with the
   compute-only round time (one client's local training on its digits partition without
   DP-SGD, the floor of any round) and with the round time of a local deployment: the
   rounds of a ``flwr-guard demo --summary`` run given with ``--demo-summary`` (the demo
   audits every node in every round, so its ``audit-seconds`` against the round's
   ``elapsed-s`` difference is the measured cost of a sampled round), else
   benchmarks/demo.py's benchmarks/results/demo.json if present.

Usage: python benchmarks/audit.py [--device cpu|cuda|auto] [--effort 0.5] [--repeats 2]
       [--nodes 2] [--demo-summary SUMMARY.json] [--out benchmarks/results/audit.json]
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tomllib
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.apps.digits.training import train_epochs
from flwr_guard.audit import AuditPlan, AuditSampling, LocalTraining, Protections, run_audit
from flwr_guard.audit.audit_mod import LeakageAuditConfig
from flwr_guard.audit.data import client_pool
from flwr_guard.audit.suite import ATTACKS
from flwr_guard.audit.sweep import MODELS

RESULTS = Path(__file__).parent / "results"
APP_CONFIG = (Path(__file__).parent.parent / "src" / "flwr_guard" / "apps" / "digits"
              / "pyproject.toml")


def app_run_config() -> dict:
    """The reference app's default run config ([tool.flwr.app.config])."""
    return tomllib.loads(APP_CONFIG.read_text())["tool"]["flwr"]["app"]["config"]


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
        rows.append({"plan": "library default", "protections": name,
                     "seconds": round(statistics.mean(seconds), 3),
                     "max-seconds": round(max(seconds), 3), "leaks": sum(leaks),
                     "audits": repeats, "budget-s": default.time_budget_s})
    from flwr_guard.apps.digits.leakage_audit import audit_config

    app_plan = audit_config(app_run_config()).plan
    seconds, leaks = [], []
    for seed in range(repeats):
        report = run_audit(model, images, labels, app_plan, seed=seed, device=device)
        seconds.append(report.seconds)
        leaks.append(report.leaks)
    rows.append({"plan": "reference app", "protections": app_plan.protections.label,
                 "seconds": round(statistics.mean(seconds), 3),
                 "max-seconds": round(max(seconds), 3), "leaks": sum(leaks),
                 "audits": repeats, "budget-s": app_plan.time_budget_s})
    return rows


def local_training_seconds(repeats: int, nodes: int) -> float:
    """One node's local training in the reference app, without DP-SGD (a floor: Opacus'
    per-example gradients only add time): its share of the digits pool after the test
    split, ``local-epochs`` of SGD at the app's batch size, learning rate and momentum."""
    from torch.utils.data import DataLoader, TensorDataset

    cfg = app_run_config()
    pool = round(1797 * (1 - float(cfg["test-fraction"])))
    images, labels = client_pool(8, pool // nodes, seed=1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=int(cfg["batch-size"]),
                        shuffle=True)
    times = []
    for i in range(repeats + 1):  # the first run warms up (not counted)
        model = DigitsCNN()
        start = time.monotonic()
        train_epochs(model, loader, int(cfg["local-epochs"]), float(cfg["learning-rate"]),
                     float(cfg["momentum"]), torch.device("cpu"))
        if i:
            times.append(time.monotonic() - start)
    return statistics.mean(times)


def demo_rounds(path: Path) -> list[dict]:
    """Round time (difference of the progress lines' ``elapsed-s``) and the round's
    longest audit (``audit-seconds``, the maximum over the nodes) of a demo summary."""
    summary = json.loads(path.read_text())
    rounds = sorted((r for r in summary["rounds"] if r.get("round", 0) > 0),
                    key=lambda r: r["round"])
    previous = next((r["elapsed-s"] for r in summary["rounds"] if r.get("round") == 0), None)
    out = []
    for r in rounds:
        train = r.get("train", {})
        row = {"round": r["round"], "audits": int(train.get("audit-ran", 0)),
               "audit-s": round(float(train.get("audit-seconds", 0.0)), 2)}
        stages = (r.get("secagg") or {}).get("stage_seconds") or {}
        if "masked-input" in stages:
            row["masked-input-s"] = round(float(stages["masked-input"]), 2)
        if previous is not None:
            row["round-s"] = round(r["elapsed-s"] - previous, 2)
            row["audit-share"] = round(row["audit-s"] / row["round-s"], 3)
        previous = r["elapsed-s"]
        out.append(row)
    return out


def overhead(name: str, round_fraction: float, client_fraction: float, audit_s: float,
             nodes: int, training_s: float, deployment_round_s: float | None,
             deployment_source: str | None) -> dict:
    sampling = AuditSampling(round_fraction=round_fraction, client_fraction=client_fraction)
    p_round = round_fraction * (1 - (1 - client_fraction) ** nodes)
    draws = [any(sampling.sampled(r, n) for n in range(nodes)) for r in range(20_000)]
    out = {
        "sampling": name,
        "round-fraction": round_fraction,
        "client-fraction": client_fraction,
        "nodes": nodes,
        "p-round-audited": round(p_round, 4),
        "p-round-audited-measured": round(sum(draws) / len(draws), 4),
        "audit-s": round(audit_s, 3),
        "expected-overhead-s-per-round": round(p_round * audit_s, 3),
        "compute-only-round-s": round(training_s, 3),
        "overhead-vs-compute-only": round(p_round * audit_s / training_s, 3),
    }
    if deployment_round_s:
        base = deployment_round_s
        out["deployment-round-s"] = round(base, 2)
        out["deployment-round-source"] = deployment_source
        out["overhead-vs-deployment-round"] = round(p_round * audit_s / base, 4)
        out["sampled-round-overhead-vs-deployment-round"] = round(audit_s / base, 4)
    return out


def deployment_round(nodes: int, demo: list[dict] | None) -> tuple[float | None, str | None]:
    """Round time of a deployment without the audit: the demo's mean round time less its
    mean audit time, else benchmarks/results/demo.json (measured before the audit was
    wired into the app)."""
    if demo:
        timed = [r for r in demo if "round-s" in r]
        if timed:
            without = statistics.mean(r["round-s"] - r["audit-s"] for r in timed)
            return without, "demo summary: mean round-s minus audit-s"
    path = RESULTS / "demo.json"
    if path.exists():
        rows = [r for r in json.loads(path.read_text())["results"] if r["nodes"] == nodes]
        if rows:
            return rows[0]["later_rounds_mean_s"], "benchmarks/results/demo.json"
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--effort", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--demo-summary", type=Path, default=None,
                        help="JSON of `flwr-guard demo --summary` (rounds with audit-seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS / "audit.json")
    args = parser.parse_args()
    console = Console()
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    attacks = time_attacks(args.device, args.effort, args.repeats)
    table = Table(title=f"time per attack ({args.device}, effort {args.effort}, "
                        "batch size 1, no defence)")
    for col in ("model", "image", "attack", "seconds", "iterations", "ms/iteration", "PSNR (dB)"):
        table.add_column(col, justify="right")
    for r in attacks:
        table.add_row(r["model"], f"{r['image']}px", r["attack"], f"{r['seconds']:.2f}",
                      f"{r['iterations']:.0f}", f"{r['ms-per-iteration']:.1f}",
                      f"{r['psnr-db']:.1f}")
    console.print(table)
    audits = time_audits(args.device, args.repeats)
    table = Table(title="time per audit (DigitsCNN 8x8, effort 0.5)")
    for col in ("plan", "protections", "mean s", "max s", "budget s", "leaks"):
        table.add_column(col, justify="right")
    for r in audits:
        table.add_row(r["plan"], r["protections"], f"{r['seconds']:.2f}", f"{r['max-seconds']:.2f}",
                      f"{r['budget-s']:g}", f"{r['leaks']}/{r['audits']}")
    console.print(table)
    training_s = local_training_seconds(max(args.repeats, 1), args.nodes)
    demo = demo_rounds(args.demo_summary) if args.demo_summary else None
    if demo:
        table = Table(title=f"measured in flwr-guard demo ({args.demo_summary.name}): "
                            "every node audits every round")
        for col in ("round", "audits", "round s", "masked-input s", "longest audit s",
                    "audit share"):
            table.add_column(col, justify="right")
        for r in demo:
            table.add_row(str(r["round"]), str(r["audits"]), str(r.get("round-s", "")),
                          str(r.get("masked-input-s", "")), f"{r['audit-s']:.2f}",
                          str(r.get("audit-share", "")))
        console.print(table)
    base_s, base_source = deployment_round(args.nodes, demo)
    default_s = max(r["max-seconds"] for r in audits if r["plan"] == "library default")
    app_s = max(r["max-seconds"] for r in audits if r["plan"] == "reference app")
    library = LeakageAuditConfig().sampling
    app_cfg = app_run_config()
    over = [
        overhead("library default (AuditSampling())", library.round_fraction,
                 library.client_fraction, default_s, args.nodes, training_s, base_s,
                 base_source),
        overhead("reference app (apps/digits/pyproject.toml)",
                 float(app_cfg["audit-round-fraction"]), float(app_cfg["audit-client-fraction"]),
                 app_s, args.nodes, training_s, base_s, base_source),
    ]
    table = Table(title="audit overhead per round at the default sampling")
    table.add_column("quantity")
    for o in over:
        table.add_column(o["sampling"], justify="right")
    for key in over[0]:
        if key != "sampling":
            table.add_row(key, *(str(o.get(key, "")) for o in over))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": args.device,
                    "platform": platform.platform()},
        "effort": args.effort, "repeats": args.repeats,
        "load-average-at-start": load_at_start,
        "attacks": attacks, "audits": audits, "overhead": over, "demo-rounds": demo,
        "seconds": round(time.monotonic() - started, 1),
    }, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
