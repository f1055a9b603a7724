"""Robust training on the reference app's digits CNN: plain vs CURE vs SCORPIO vs PGD-AT,
and the SGAM leakage experiment.

Part 1 (study, :func:`flwr_guard.robust.study.run_study`): each objective and seed
trains ``DigitsCNN`` on scikit-learn's digits (fixed 80/20 split, 1437 / 360 images,
centralised: the robustness of the *model*, not of federation), then measures clean
accuracy, robust accuracy under FGSM, PGD-40 with 2 restarts (all 360 test images),
SPSA and Square (the first ``--zo-examples`` test images: zeroth-order attacks cost
thousands of queries each; SPSA 20 steps x 16 probe pairs, Square 500
queries) at eps 0.05, 0.1, 0.2, an unbounded PGD, the masking
detector's verdict, the attribution scores (first 16 test images) and the cost per
training step as a ratio to plain SGD of the same seed in the same run. The detector's
controls (the plain model behind a 4-level input quantisation, attacked directly and
through BPDA) run on the same test set.

Part 2 (SGAM leakage). The support criterion, fixed before the run: SGAM supports the
source's claim if the mean PSNR of the gradient-inversion audit's best reconstruction,
restricted to each victim's salient pixels (the 16 of 64 pixels with the largest |IG|
of the *plain* model for the true label), falls by at least 3 dB with SGAM, over 20
victims per seed and every seed, with at most 2 points of test accuracy lost. Audit:
flwr_guard.audit.run_audit, batch size 1, one local SGD step (FedSGD), no protections
(the attacker's best case), attacks ``ig`` and ``idlg`` at a fixed iteration count
(``--sgam-effort``, no time budget); the attacker knows the whole
architecture including SGAM and its weights (they are part of the shared model).

Usage: python benchmarks/robustness.py [--seeds 0,1,2] [--epochs 6] [--device cpu] [--quick]
Writes benchmarks/results/robustness.json, robustness.md and docs/img/robustness_*.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.robust.attributions import ig_map
from flwr_guard.robust.evaluation import AttackSettings
from flwr_guard.robust.objectives import RobustObjective, train_robust_epochs
from flwr_guard.robust.report import (
    markdown_table,
    plot_attributions,
    plot_robust_accuracy,
    write_json,
)
from flwr_guard.robust.sgam import SGAM
from flwr_guard.robust.study import StudyPlan, attribution_maps, run_study

RESULTS = REPO / "benchmarks" / "results"
IMG = REPO / "docs" / "img"


def digits_split():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order[:1437]], y[order[:1437]], x[order[1437:]], y[order[1437:]]


def region_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    mse = float(((a - b) ** 2)[mask].mean())
    return 100.0 if mse == 0 else 10 * np.log10(1.0 / mse)


def train_sgam(seed: int, x, y, epochs: int, lr: float) -> SGAM:
    torch.manual_seed(seed)
    sgam = SGAM(DigitsCNN(), strength=0.8)
    opt = torch.optim.SGD(sgam.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            (F.cross_entropy(sgam(xb), yb) + sgam.saliency_loss(xb, yb)).backward()
            opt.step()
    return sgam.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def sgam_experiment(seeds, x_tr, y_tr, x_te, y_te, epochs, victims, effort) -> dict:
    from flwr_guard.audit import AuditPlan, run_audit
    from flwr_guard.audit.update import LocalTraining

    # fixed iterations (no time budget): a budget would give the attacker fewer
    # iterations when the shared machine is busy, and make the result depend on the load
    plan = AuditPlan(batch_size=1, training=LocalTraining(1, 0.1), attacks=("ig", "idlg"),
                     effort=effort, time_budget_s=None)
    client_images, client_labels = x_te[:100], y_te[:100]
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        plain = DigitsCNN()
        train_robust_epochs(plain, DataLoader(TensorDataset(x_tr, y_tr), batch_size=64, shuffle=True,
                                              generator=torch.Generator().manual_seed(seed)),
                            RobustObjective("plain"), epochs, 0.1, 0.9, torch.device("cpu"))
        plain.eval()
        sgam = train_sgam(seed, x_tr, y_tr, epochs, 0.1)
        # the support region, fixed from the plain model before any attack runs
        ig = ig_map(plain, client_images[:victims], client_labels[:victims]).abs().sum(1).flatten(1)
        salient = torch.zeros_like(ig, dtype=torch.bool)
        salient.scatter_(1, ig.topk(16, dim=1).indices, True)
        salient = salient.reshape(victims, 1, 8, 8)
        entry = {"seed": seed, "accuracy": {"plain": accuracy(plain, x_te, y_te),
                                            "sgam": accuracy(sgam, x_te, y_te)}}
        for name, model in (("plain", plain), ("sgam", sgam)):
            region, whole = [], []
            for v in range(victims):
                report = run_audit(model, client_images, client_labels, plan, seed=seed * 1000 + v,
                                   victim_indices=torch.tensor([v]))
                rec, orig = report.reconstructions[0], report.originals[0]
                region.append(region_psnr(rec, orig, salient[v]))
                whole.append(region_psnr(rec, orig, torch.ones_like(salient[v])))
            entry[name] = {"salient_psnr_db": region, "image_psnr_db": whole}
        rows.append(entry)
        print(f"  SGAM seed {seed}: acc plain {entry['accuracy']['plain']:.3f} sgam "
              f"{entry['accuracy']['sgam']:.3f}; salient PSNR plain "
              f"{np.mean(entry['plain']['salient_psnr_db']):.2f} dB, sgam "
              f"{np.mean(entry['sgam']['salient_psnr_db']):.2f} dB", flush=True)
    drop = [np.mean(r["plain"]["salient_psnr_db"]) - np.mean(r["sgam"]["salient_psnr_db"]) for r in rows]
    acc_lost = [r["accuracy"]["plain"] - r["accuracy"]["sgam"] for r in rows]
    supported = all(d >= 3.0 for d in drop) and all(a <= 0.02 for a in acc_lost)
    return {"criterion": "salient-region PSNR falls by >= 3 dB in every seed (20 victims each) "
                         "with <= 2 points of test accuracy lost",
            "seeds": rows, "salient_psnr_drop_db": drop, "accuracy_lost": acc_lost,
            "supported": supported}


def step_cost(objectives, x, y, steps: int = 15, rounds: int = 3) -> dict[str, float]:
    """Median seconds per training step of each objective on the same 64-image batches,
    the objectives interleaved in each of ``rounds`` rounds (3 warm-up steps each), so
    that a shared machine's changing load hits them alike."""
    times: dict[str, list[float]] = {o.objective: [] for o in objectives}
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 64 * (steps + 3), 64)]
    for r in range(rounds):
        for o in objectives:
            torch.manual_seed(r)
            model = DigitsCNN().train()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            for k, (xb, yb) in enumerate(batches):
                if k == 3:
                    start = time.perf_counter()
                opt.zero_grad()
                o.loss(model, xb, yb).backward()
                opt.step()
            times[o.objective].append((time.perf_counter() - start) / steps)
    return {k: float(np.median(v)) for k, v in times.items()}


def sweep(x_tr, y_tr, epochs: int) -> list[dict]:
    """lambda of CURE and SCORPIO on a validation split of the training set (the last 287
    of 1437 images; the test set is not used): clean and PGD-10 accuracy at eps 0.1."""
    from flwr_guard.robust.attacks import pgd

    x_fit, y_fit, x_val, y_val = x_tr[:1150], y_tr[:1150], x_tr[1150:], y_tr[1150:]
    rows = []
    for objective in (RobustObjective("cure", 0.1, 1.0), RobustObjective("cure", 0.1, 4.0),
                      RobustObjective("scorpio", 0.1, 0.1), RobustObjective("scorpio", 0.1, 0.3),
                      RobustObjective("scorpio", 0.1, 1.0)):
        torch.manual_seed(0)
        model = DigitsCNN()
        train_robust_epochs(model, DataLoader(TensorDataset(x_fit, y_fit), batch_size=64, shuffle=True,
                                              generator=torch.Generator().manual_seed(0)),
                            objective, epochs, 0.1, 0.9, torch.device("cpu"))
        model.eval()
        adv = pgd(model, x_val, y_val, 0.1, steps=10, generator=torch.Generator().manual_seed(0))
        row = {"objective": objective.objective, "lambda": objective.lam,
               "clean": accuracy(model, x_val, y_val), "pgd10_0.1": accuracy(model, adv, y_val)}
        print(f"  sweep {row}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--zo-examples", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sgam-victims", type=int, default=20)
    p.add_argument("--sgam-effort", type=float, default=0.25,
                   help="audit effort (ig: 600 x effort iterations, 2 restarts; idlg: 300 x effort)")
    p.add_argument("--sgam-only", action="store_true",
                   help="rerun only the SGAM experiment into the existing robustness.json")
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds; not for docs)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--sweep", action="store_true", help="only the lambda sweep (validation split)")
    p.add_argument("--cure-lambda", type=float, default=4.0)
    p.add_argument("--scorpio-lambda", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(1)  # fastest for 8x8 convolutions on a shared CPU (flwr_guard.device.cpu_settings)
    torch.backends.mkldnn.enabled = False
    seeds = tuple(int(s) for s in args.seeds.split(","))
    x_tr, y_tr, x_te, y_te = digits_split()
    if args.sgam_only:
        path = args.out / "robustness.json"
        record = json.loads(path.read_text())
        record["sgam"] = sgam_experiment(seeds, x_tr, y_tr, x_te, y_te, args.epochs, args.sgam_victims,
                                         args.sgam_effort)
        record["sgam"]["effort"] = args.sgam_effort
        write_json(record, path)
        print(f"SGAM supported: {record['sgam']['supported']} (drop {record['sgam']['salient_psnr_drop_db']})")
        return
    if args.sweep:
        rows = sweep(x_tr, y_tr, args.epochs)
        write_json({"sweep": rows, "epochs": args.epochs}, args.out / "robustness_sweep.json")
        return
    attacks = AttackSettings(zeroth_order_examples=args.zo_examples, spsa_steps=20, spsa_samples=16)
    epochs = args.epochs
    if args.quick:
        seeds, epochs = seeds[:1], 1
        x_te, y_te = x_te[:40], y_te[:40]
        attacks = AttackSettings(pgd_steps=5, spsa_steps=3, spsa_samples=4, square_queries=20,
                                 zeroth_order_examples=10)
    objectives = (RobustObjective("plain"), RobustObjective("cure", 0.1, args.cure_lambda),
                  RobustObjective("scorpio", 0.1, args.scorpio_lambda),
                  RobustObjective("pgd-at", 0.1, steps=5))
    plan = StudyPlan(objectives=objectives, seeds=seeds, epochs=epochs, attacks=attacks, device=args.device,
                     attribution_examples=8 if args.quick else 16)
    start = time.perf_counter()

    def progress(entry):
        pgd = entry["robust_accuracy"]["pgd"]
        print(f"  {entry['objective']:<32} seed {entry['seed']}: clean {entry['clean_accuracy']:.3f}, "
              f"pgd@0.1 {pgd['0.1']:.3f}, square@0.1 {entry['robust_accuracy']['square']['0.1']:.3f}, "
              f"masking {entry['masking']['suspected']}, step x{entry['cost_ratio']:.2f} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)

    record, trained = run_study(DigitsCNN, x_tr, y_tr, x_te, y_te, plan, on_model=progress)
    # cost per step: interleaved timing (the per-training measurement drifts with the load)
    cost = step_cost(objectives, x_tr, y_tr, steps=3 if args.quick else 15, rounds=1 if args.quick else 3)
    record["step_seconds"] = cost
    for entry in record["models"]:
        entry["train_cost_ratio"] = entry["cost_ratio"]
        entry["cost_ratio"] = cost[entry["config"]["objective"]] / cost["plain"]
    print("  step seconds:", {k: round(v, 4) for k, v in cost.items()})
    for c in record.get("controls", []):
        print(f"  control: {c['control']}: masking {c['masking']['suspected']} {c['masking']['fired']}")
    record["sgam"] = sgam_experiment(seeds[: 1 if args.quick else 3], x_tr, y_tr, x_te, y_te, epochs,
                                     4 if args.quick else args.sgam_victims,
                                     0.05 if args.quick else args.sgam_effort)
    record["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    record["seconds"] = time.perf_counter() - start
    stem = "robustness_quick" if args.quick else "robustness"
    write_json(record, args.out / f"{stem}.json")
    table = markdown_table(record)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    if not args.quick:
        plot_robust_accuracy(record, IMG / "robustness_accuracy.png")
        first = {k: m for k, m in trained.items() if k.endswith(f"/{seeds[0]}")}
        maps = attribution_maps(first, x_te[:3], y_te[:3])
        plot_attributions(x_te[:3, 0].numpy(), maps, IMG / "robustness_attributions.png")
    print(f"SGAM supported: {record['sgam']['supported']} (drop {record['sgam']['salient_psnr_drop_db']})")
    print(f"done in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
