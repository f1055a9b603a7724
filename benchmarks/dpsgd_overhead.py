"""Step time and peak memory of DP-SGD (Opacus, standard and ghost clipping) vs SGD.

Each (model, mode) runs in a fresh subprocess so peak memory is its own: on CPU the
peak resident set size (``ru_maxrss``) minus the resident size just before training
(so the interpreter, torch and the data are not counted); on CUDA
``torch.cuda.max_memory_allocated``. Step time is the median over ``--steps`` timed
steps after ``--warmup`` untimed ones (forward, backward, clipping, noise, update), at a
fixed batch size (no Poisson sampling here: the cost of a step is what is measured).

Models: the reference app's ``DigitsCNN`` (8x8 inputs, 38k parameters) and a larger
GroupNorm CNN on 32x32x3 inputs (``larger-cnn``, 625k parameters).

Usage: python benchmarks/dpsgd_overhead.py [--device cpu|cuda] [--batch 64] [--steps 20]
Prints a table and writes JSON (benchmarks/results/dpsgd_overhead_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("non-private", "dpsgd", "dpsgd-ghost")
MODELS = ("digits-cnn", "larger-cnn")


def _build(name: str):
    import torch
    from torch import nn

    from flwr_guard.apps.digits.model import DigitsCNN

    if name == "digits-cnn":
        return DigitsCNN(), (1, 8, 8)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.ReLU()]

    model = nn.Sequential(
        *block(3, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        *block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10),
    )
    torch.manual_seed(0)
    return model, (3, 32, 32)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(model_name: str, mode: str, device_name: str, batch: int, steps: int, warmup: int,
           threads: int) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from flwr_guard.dp.dpsgd import DPSGD, DPSGDConfig

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model, shape = _build(model_name)
    model.to(device)
    n = batch * (steps + warmup)
    data = TensorDataset(torch.rand(n, *shape), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    module = model
    if mode != "non-private":
        dpsgd = DPSGD(DPSGDConfig(1.0, 1.0, grad_sample_mode="ghost" if mode == "dpsgd-ghost" else "hooks"))
        module, optimizer, criterion, _ = dpsgd.make_private(model, optimizer, loader, criterion)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    for i, (x, y) in enumerate(loader):  # fixed-size batches: the cost of one step
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        optimizer.zero_grad()
        criterion(module(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"model": model_name, "mode": mode, "device": device_name, "batch": batch,
            "parameters": params, "step_ms": 1000 * statistics.median(times),
            "step_ms_all": [1000 * t for t in times], "peak_mem_mb": max(peak, 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.batch, args.steps, args.warmup,
                                args.threads)))
        return

    rows = []
    for model in args.models:
        for mode in MODES:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", model, mode, "--device", args.device,
                 "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            base = next(r for r in rows if r["model"] == model and r["mode"] == "non-private")
            r = rows[-1]
            r["time_ratio"] = r["step_ms"] / base["step_ms"]
            r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] else None
            print(f"{model:>11} {mode:>12}  {r['parameters']:>9,d} params  step {r['step_ms']:8.1f} ms "
                  f"(x{r['time_ratio']:.2f})  peak +{r['peak_mem_mb']:7.1f} MiB", flush=True)
    import torch

    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": args.threads,
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    out = args.out or Path(f"benchmarks/results/dpsgd_overhead_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
