"""Server test accuracy on digits vs epsilon: DP-SGD, central DP and distributed DP.

Clients are simulated **in process** with flwr-guard's DP cores (not through Flower's
transport: these are the same functions the mods and the strategy wrapper call, and the
utility does not depend on the transport). Everything trains the reference model
(``DigitsCNN``, 38k parameters) on scikit-learn's digits; the server's test set is the
held-out 20 %.

Settings (delta = 1e-5 everywhere, noise multipliers calibrated with
``noise_multiplier_for_epsilon``), accounted as flwr-guard accounts them:

- ``dpsgd`` (record level): ``--dpsgd-clients`` clients share the 1437 training images;
  all take part every round; each runs one epoch of DP-SGD (Opacus' Poisson data loader:
  Poisson amplification is real here) per round, its steps reserved in the ledger before
  training (``DPSGD(epochs=1)``). Epsilon is each client's record-level epsilon (RDP).
- ``central`` (user level): a population of ``--population`` clients, a *fixed-size*
  cohort of ``--cohort`` drawn without replacement each round (as Flower's FedAvg does),
  one local epoch of SGD, the update clipped to ``--clip``, the *sum* noised with
  ``z C`` and divided by the fixed denominator ``--cohort`` (``DPFedAvg``'s arithmetic).
  Accounted with **no amplification** (``sampling="none"``: the Gaussian mechanism
  composed over the rounds), DPFedAvg's default.
- ``distributed`` (user level): the same cohort and clipping, but each client rotates,
  quantises (32-bit modulus) and adds Skellam noise for ``n`` clients
  (``DistributedNoise``); the server decodes the modular sum. Accounted with Skellam's
  own RDP (Agarwal et al. 2021) and no amplification (the server picks the cohort);
  ``z`` is the smallest multiple (1 %) of the Gaussian calibration that fits.
  Wrap-arounds are counted.
- ``non-private``: the same federations without clipping or noise.

Usage: python benchmarks/dp_utility.py [--rounds 40] [--epsilons 1 3 8] [--seeds 1]
Prints a table, writes JSON (benchmarks/results/dp_utility.json) and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.dp.accounting import (
    Step,
    compute_epsilon,
    epsilon_of_steps,
    noise_multiplier_for_epsilon,
)
from flwr_guard.dp.central import add_gaussian_noise, central_noise_std
from flwr_guard.dp.clipping import clip_update
from flwr_guard.dp.distributed import DistributedNoise, count_wraparounds, from_modular
from flwr_guard.dp.dpsgd import DPSGD, DPSGDConfig
from flwr_guard.dp.skellam_accounting import quantised_l1_bound

DELTA = 1e-5


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int,
              generator: torch.Generator) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), batch):
        idx = order[i : i + batch]
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()


def run_user_level(mode: str, z: float, args: argparse.Namespace, data, seed: int
                   ) -> dict:
    """FedAvg over a population with fixed-size cohorts: non-private, central or distributed."""
    xtr, ytr, xte, yte = data
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts = np.array_split(rng.permutation(len(ytr)), args.population)
    model, local = DigitsCNN(), DigitsCNN()
    dim = parameters_to_vector(model.parameters()).numel()
    q = args.cohort / args.population
    wraps, noise = 0, None
    for rnd in range(args.rounds):
        cohort = rng.choice(args.population, args.cohort, replace=False)
        g = parameters_to_vector(model.parameters()).detach().numpy().astype(np.float64)
        updates = []
        for c in cohort:
            vector_to_parameters(torch.tensor(g, dtype=torch.float32), local.parameters())
            local_sgd(local, xtr[parts[c]], ytr[parts[c]], args.lr, args.batch, gen)
            u = parameters_to_vector(local.parameters()).detach().numpy().astype(np.float64) - g
            if mode != "non-private":
                u = clip_update([u], args.clip)[0][0]
            updates.append(u)
        n = len(updates)
        if mode == "non-private":
            mean = np.mean(updates, axis=0)
        elif mode == "central":  # noised sum / fixed denominator (= z C / cohort on the mean)
            mean = add_gaussian_noise([np.sum(updates, axis=0) / args.cohort],
                                      central_noise_std(z, args.clip, args.cohort), rng)[0]
        else:
            noise = DistributedNoise.calibrate(z, args.clip, dim, n, bits=args.bits)
            total = None
            true_sum = 0
            for u in updates:
                enc = noise.encode(u, seed=rnd, rng=rng)
                true_sum = true_sum + from_modular(enc, args.bits)
                total = enc if total is None else (total + enc) % np.uint64(1 << args.bits)
            wraps += count_wraparounds(true_sum, args.bits)
            mean = noise.decode(total, seed=rnd, num_contributors=n)
        vector_to_parameters(torch.tensor(g + args.server_lr * mean, dtype=torch.float32),
                             model.parameters())
    out = {"accuracy": accuracy(model, xte, yte), "cohort_fraction": q}
    if mode == "distributed":
        out["wraparounds"] = wraps
        out["bits"] = args.bits
    return out


def run_dpsgd(z: float | None, args: argparse.Namespace, data, seed: int) -> dict:
    """All ``dpsgd_clients`` clients every round; each runs one epoch of (DP-)SGD."""
    xtr, ytr, xte, yte = data
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts = np.array_split(rng.permutation(len(ytr)), args.dpsgd_clients)
    model = DigitsCNN()
    states: list = [None] * args.dpsgd_clients
    eps = 0.0
    for _ in range(args.dpsgd_rounds):
        g = parameters_to_vector(model.parameters()).detach().clone()
        locals_ = []
        for c, idx in enumerate(parts):
            local = DigitsCNN()
            vector_to_parameters(g, local.parameters())
            if z is None:
                local_sgd(local, xtr[idx], ytr[idx], args.lr, args.dpsgd_batch, gen)
            else:
                dpsgd = DPSGD(DPSGDConfig(z, args.dpsgd_clip, DELTA), states[c], epochs=1,
                              noise_generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
                loader = DataLoader(TensorDataset(xtr[idx], ytr[idx]), batch_size=args.dpsgd_batch)
                private = dpsgd.make_private(local, torch.optim.SGD(local.parameters(), lr=args.dpsgd_lr), loader)
                for xb, yb in private.data_loader:
                    if len(yb) == 0:
                        continue
                    private.optimizer.zero_grad()
                    private.criterion(private.module(xb), yb).backward()
                    private.optimizer.step()
                dpsgd.finish()
                states[c] = dpsgd.accountant_state()
                eps = max(eps, dpsgd.epsilon(DELTA))
            locals_.append(parameters_to_vector(local.parameters()).detach())
        vector_to_parameters(torch.stack(locals_).mean(0), model.parameters())
    return {"accuracy": accuracy(model, xte, yte), "record_epsilon": eps}


def skellam_epsilon(z: float, args: argparse.Namespace) -> float:
    """Epsilon of ``--rounds`` distributed rounds with Skellam's RDP, no amplification."""
    dim = parameters_to_vector(DigitsCNN().parameters()).numel()
    noise = DistributedNoise.calibrate(z, args.clip, dim, args.cohort, bits=args.bits)
    l2 = noise.sensitivity
    padded = 1 << max(0, (dim - 1).bit_length())
    mu = noise.num_clients * noise.mu
    step = Step(noise.effective_noise_multiplier, 1.0, args.rounds,
                skellam=(l2, quantised_l1_bound(l2, padded), mu))
    return epsilon_of_steps([step], DELTA, "rdp", "none")


def skellam_noise_multiplier(z_gaussian: float, target: float, args: argparse.Namespace) -> float:
    """The smallest ``z_gaussian * 1.01^k`` whose Skellam epsilon is within ``target``."""
    z = z_gaussian
    while skellam_epsilon(z, args) > target:
        z *= 1.01
    return z


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"dpsgd": "o-", "central": "s-", "distributed": "^--"}
    for setting, style in styles.items():
        rows = sorted((r for r in results if r["setting"] == setting), key=lambda r: r["epsilon"])
        if rows:
            ax.plot([r["epsilon"] for r in rows], [100 * r["accuracy"] for r in rows], style,
                    label={"dpsgd": "record-level DP-SGD", "central": "user-level central DP",
                           "distributed": "user-level distributed DP (Skellam)"}[setting])
    colors = {"dpsgd-baseline": "C0", "user-baseline": "C1"}
    for r in results:
        if r["setting"] in colors:
            ax.axhline(100 * r["accuracy"], color=colors[r["setting"]], ls=":", lw=1,
                       label=f"non-private ({'DP-SGD' if r['setting'] == 'dpsgd-baseline' else 'user-level'} federation)")
    ax.set_xscale("log")
    ticks = sorted({r["epsilon"] for r in results if math.isfinite(r["epsilon"])})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("server test accuracy (%)")
    ax.set_title("digits: accuracy vs privacy (user level: no amplification)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--settings", nargs="+", default=["dpsgd", "central", "distributed"])
    parser.add_argument("--seeds", type=int, default=1)
    # user level
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=30, help="expected clients per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bits", type=int, default=32)
    # record level
    parser.add_argument("--dpsgd-clients", type=int, default=5)
    parser.add_argument("--dpsgd-rounds", type=int, default=15)
    parser.add_argument("--dpsgd-batch", type=int, default=32)
    parser.add_argument("--dpsgd-clip", type=float, default=1.0)
    parser.add_argument("--dpsgd-lr", type=float, default=0.5,
                        help="DP-SGD step size (the non-private baseline uses --lr: 0.5 diverges "
                        "without clipping)")
    parser.add_argument("--include", type=Path, nargs="*", default=[],
                        help="earlier JSON outputs whose settings this run does not repeat "
                        "(added to the JSON and the plot)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_utility.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/dp_utility.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    results: list[dict] = []
    started = time.time()

    def record(setting: str, epsilon: float, z: float | None, runs: list[dict], **extra) -> None:
        row = {"setting": setting, "epsilon": epsilon, "noise_multiplier": z, **extra,
               "accuracy": float(np.mean([r["accuracy"] for r in runs])),
               "accuracy_runs": [r["accuracy"] for r in runs],
               **{k: v for k, v in runs[0].items() if k not in ("accuracy",)}}
        results.append(row)
        print(f"{setting:>15}  eps={epsilon:<6g} z={'-' if z is None else f'{z:.3f}':>6}  "
              f"acc={100 * row['accuracy']:.1f}%  ({time.time() - started:.0f} s)", flush=True)

    seeds = range(args.seeds)
    user = [load_digits_split(0)] * args.seeds
    if "dpsgd" in args.settings:
        record("dpsgd-baseline", math.inf, None, [run_dpsgd(None, args, user[s], s) for s in seeds])
        per_client = math.ceil(1437 / args.dpsgd_clients)
        q = args.dpsgd_batch / per_client
        steps = args.dpsgd_rounds * math.ceil(per_client / args.dpsgd_batch)
        for eps in args.epsilons:
            z = noise_multiplier_for_epsilon(eps, q, steps, DELTA)
            record("dpsgd", eps, z, [run_dpsgd(z, args, user[s], s) for s in seeds])
    if {"central", "distributed"} & set(args.settings):
        record("user-baseline", math.inf, None,
               [run_user_level("non-private", 0.0, args, user[s], s) for s in seeds])
        q = args.cohort / args.population
        for eps in args.epsilons:
            # No amplification: DPFedAvg's default (Flower's fixed-size cohort).
            z = noise_multiplier_for_epsilon(eps, 1.0, args.rounds, DELTA, sampling="none")
            assert compute_epsilon(z, 1.0, args.rounds, DELTA, sampling="none") <= eps + 1e-6
            z_poisson = noise_multiplier_for_epsilon(eps, q, args.rounds, DELTA)
            for setting in ("central", "distributed"):
                if setting not in args.settings:
                    continue
                z_run = z if setting == "central" else skellam_noise_multiplier(z, eps, args)
                record(setting, eps, z_run, [run_user_level(setting, z_run, args, user[s], s)
                                             for s in seeds],
                       epsilon_if_poisson=compute_epsilon(z_run, q, args.rounds, DELTA),
                       z_if_poisson=z_poisson)

    included_meta = {}
    for path in args.include:
        done = {(r["setting"], r["epsilon"]) for r in results}
        earlier = json.loads(path.read_text())
        added = [r for r in earlier["results"] if (r["setting"], r["epsilon"]) not in done]
        results += added
        included_meta[str(path)] = {"settings": sorted({r["setting"] for r in added}),
                                    **earlier["meta"]}
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "delta": DELTA, "args": {k: str(v) for k, v in vars(args).items()},
            "elapsed_s": round(time.time() - started, 1), "included": included_meta}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
