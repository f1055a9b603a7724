"""Trap-model check: detection and false-positive rates over repeated trials.

1. Core check (:func:`flwr_guard.audit.trap_check.check_model`), each trial a fresh
   model initialisation and a different client partition (300 digits / 60 wine rows),
   simulated aggregate of 4 clients x 32 records (the defaults):
   - honest: random init, and trained (3 epochs of SGD on the other records);
   - imprint: Fowl et al. 2022 binning layer planted in the first linear layer
     (:func:`flwr_guard.audit.imprint.plant_imprint`, bins from public records);
   - trap weights: Boenisch et al. 2023, random rows whose bias lets ~1/128 of the
     population through (:func:`flwr_guard.audit.imprint.plant_trap_weights`).
   "revealed" is what the closed-form attack recovers from that aggregate (relative
   L2 error <= 1 %) — what the server would get without the check.
2. Real Flower path: GuardedStrategy(FedAvg, SecAgg+) over 4 in-process clients
   (tests/guard_harness.py: Flower's ClientApp, mods and serde; no SuperLink), the
   imprint model sent as the global model; without the check the server attacks the
   masked sum (records with PSNR >= 40 dB against the best candidate), with it every
   client refuses (GuardMismatch).

Usage: python benchmarks/audit_trap.py [--trials 10] [--flower-trials 3]
       [--out benchmarks/results/audit_trap.json]
Prints a Markdown table and writes JSON (and the table next to it, .md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits, load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

from flwr_guard.audit.imprint import plant_imprint, plant_trap_weights
from flwr_guard.audit.inputs import AuditData, prepare
from flwr_guard.audit.trap_check import check_model
from flwr_guard.models.digits_cnn import DigitsCNN

ROOT = Path(__file__).resolve().parents[1]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(d.target)


def _wine() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_wine(return_X_y=True)
    return torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float32), torch.tensor(y)


def _digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _wine_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    return model


def _case(name: str, weights: str, trial: int) -> tuple[nn.Module, AuditData]:
    torch.manual_seed(trial)
    if name == "wine MLP":
        x, y = _wine()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(trial))
        mine, rest = perm[:60], perm[60:]
        model, layer, nxt, flat = _wine_mlp(), "0", "2", x[rest]
    else:
        x, y = _digits()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(trial))
        mine, rest = perm[:300], perm[300:]
        model = DigitsCNN() if name == "digits CNN" else _digits_mlp()
        layer, nxt, flat = "1", "3", x[rest].reshape(len(rest), -1)
    if weights == "trained":
        _train(model, x[rest], y[rest])
    elif weights == "imprint":
        model.load_state_dict(plant_imprint(model.state_dict(), layer, nxt, flat))
    elif weights == "trap weights":
        model.load_state_dict(plant_trap_weights(model.state_dict(), layer, flat, 1 / 128))
    return model, prepare(x[mine], y[mine])


CASES = [
    ("digits CNN", "random init", False), ("digits CNN", "trained", False),
    ("digits MLP", "random init", False), ("digits MLP", "trained", False),
    ("digits MLP", "imprint", True), ("digits MLP", "trap weights", True),
    ("wine MLP", "random init", False), ("wine MLP", "trained", False),
    ("wine MLP", "imprint", True),
]


def core_trials(trials: int) -> list[dict]:
    rows = []
    for name, weights, malicious in CASES:
        flagged, revealed, probed, seconds, structural = 0, [], 0, [], 0
        for trial in range(trials):
            model, data = _case(name, weights, trial)
            finding = check_model(model, data, seed=trial)
            flagged += finding.trapped
            structural += "share one direction" in finding.reason
            revealed.append(finding.revealed)
            probed = finding.probed
            seconds.append(finding.seconds)
        rows.append({
            "model": name, "weights": weights, "malicious": malicious, "trials": trials,
            "flagged": flagged, "rate": flagged / trials, "structural": structural,
            "revealed-mean": statistics.mean(revealed), "revealed-max": max(revealed),
            "probed": probed, "check-seconds-median": statistics.median(seconds),
        })
        print(f"{name:10s} {weights:12s} flagged {flagged}/{trials}", flush=True)
    return rows


def flower_trials(trials: int) -> list[dict]:
    """The positive control through Flower (see the module doc)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_audit_trap as t  # the test's harness: real mods, SecAgg+, serde

    from flwr_guard.guard import GuardMismatch

    out = []
    for trial in range(trials):
        torch.manual_seed(trial)
        state = plant_imprint(t._mlp().state_dict(), "1", "3", t.PUBLIC)
        strategy, grid, trained, initial = t._run(state, audit=None)
        result = strategy.start(grid, initial, num_rounds=1)
        psnr = t._records_recovered(state, result.arrays)
        strategy, grid, trained_checked, initial = t._run(state, audit=t._audit())
        refused = ""
        try:
            strategy.start(grid, initial, num_rounds=1)
        except GuardMismatch as err:
            refused = str(err).split(" clients refused")[0].split(": ")[-1]
        out.append({"trial": trial, "records": int(psnr.numel()),
                    "exact-without-check": int((psnr >= 40).sum()),
                    "median-psnr-db": float(psnr.median()), "max-psnr-db": float(psnr.max()),
                    "refused-with-check": refused, "trained-with-check": len(trained_checked)})
        print(out[-1], flush=True)
    return out


def markdown(core: list[dict], flower: list[dict]) -> str:
    lines = ["| model | weights | server's intent | flagged (trials) | records revealed from "
             "the aggregate without the check (mean / max of 128, wine 60) | median check s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in core:
        intent = "malicious" if r["malicious"] else "honest"
        lines.append(f"| {r['model']} | {r['weights']} | {intent} | {r['flagged']}/{r['trials']} "
                     f"| {r['revealed-mean']:.1f} / {r['revealed-max']} | "
                     f"{r['check-seconds-median']:.3f} |")
    honest = [r for r in core if not r["malicious"]]
    bad = [r for r in core if r["malicious"]]
    fp = sum(r["flagged"] for r in honest) / max(1, sum(r["trials"] for r in honest))
    tp = sum(r["flagged"] for r in bad) / max(1, sum(r["trials"] for r in bad))
    lines += ["", f"Detection rate {tp:.0%} over malicious trials, false-positive rate "
              f"{fp:.0%} over honest trials."]
    if flower:
        lines += ["", "| Flower path trial | records | exact (PSNR >= 40 dB) without the check "
                  "| median PSNR dB | with the check |", "| --- | --- | --- | --- | --- |"]
        for f in flower:
            lines.append(f"| {f['trial']} | {f['records']} | {f['exact-without-check']} | "
                         f"{f['median-psnr-db']:.1f} | {f['refused-with-check']} clients "
                         f"refused, {f['trained-with-check']} trained |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--flower-trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/audit_trap.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    core = core_trials(args.trials)
    flower = flower_trials(args.flower_trials) if args.flower_trials else []
    table = markdown(core, flower)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"core": core, "flower": flower}, indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
