"""What ``--app-isolation`` costs per message: the app's child under ``sandbox`` (and
``user`` where it can run) vs ``process``, interleaved in one run.

Each sample is one ``flwr_guard.node.app_process.run_app`` call on a train message for
the probe ClientApp (``tests/fixtures/node_guard/probe``: Flower imports and an echo,
no torch): workspace, ledger handout (a real node ledger), child start, FAB install,
the app, answer, take-back. Variants alternate (process, sandbox, process, ...) so the
machine's load drift hits both; reported as the median per variant and the ratio of
medians against ``process`` in the same run. Needs root for ``sandbox``.

Usage: python benchmarks/node_guard_isolation.py [--reps 7] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "fixtures" / "node_guard" / "probe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "node_guard_isolation.json")
    args = parser.parse_args()

    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_guard.dp.record_ledger import init_ledger
    from flwr_guard.node.allowlist import fab_hash
    from flwr_guard.node.app_process import run_app
    from flwr_guard.node.isolation import AppIsolation, IsolationError

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    work = Path(tempfile.mkdtemp(prefix="flwr-guard-bench-"))
    os.environ["FLWR_HOME"] = str(work / "guard-home")
    init_ledger(work / "ledger", "default")
    content = build_fab_from_disk(PROBE)
    fab = Fab(fab_hash(content), content, {})
    run = Run.create_empty(run_id=7)
    run.fab_id, run.fab_version, run.fab_hash = "flwr-guard-tests/probe", "1.0.0", fab.hash_str

    variants = {"process": AppIsolation.resolve("process")}
    skipped = {}
    for level in ("sandbox", "user"):
        try:
            variants[level] = AppIsolation.resolve(level)
        except IsolationError as err:
            skipped[level] = str(err)

    def once(isolation: AppIsolation) -> float:
        context = Context(run_id=7, node_id=5, node_config={"dp-sgd-ledger": str(work / "ledger")},
                          state=RecordDict(), run_config={"mode": "echo"})
        msg = Message(content=RecordDict({"arrays": ArrayRecord([np.ones(3, dtype=np.float32)]),
                                          "config": ConfigRecord({})}),
                      dst_node_id=5, message_type="train", group_id="1")
        msg.metadata.__dict__["_message_id"] = msg.object_id
        msg.metadata.__dict__["_run_id"] = 7
        start = time.perf_counter()
        result = run_app(msg, context, run, fab, isolation=isolation)
        took = time.perf_counter() - start
        if result.reply.has_error():
            raise SystemExit(f"{isolation.level}: {result.reply.error.reason}")
        return took

    for isolation in variants.values():  # warm the page cache once each
        once(isolation)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, isolation in variants.items():
            samples[name].append(once(isolation))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "what": "run_app wall time per message, probe ClientApp (no torch), interleaved",
        "reps": args.reps,
        "samples_s": {k: [round(v, 4) for v in vs] for k, vs in samples.items()},
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_process": {k: round(v / medians["process"], 3) for k, v in medians.items()},
        "extra_s_vs_process": {k: round(v - medians["process"], 4) for k, v in medians.items()},
        "skipped": skipped,
        "load_average": os.getloadavg(),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_to_process", "extra_s_vs_process",
                                              "load_average")}, indent=2))


if __name__ == "__main__":
    main()
