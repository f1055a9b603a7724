"""A container's one-shot ledger step: create a SuperNode's DP-SGD ledger once, keep it after.

A SuperNode refuses DP-SGD until its operator has created the record-level ledger of its
data source (``flwr-guard ledger init``, :func:`flwr_guard.dp.record_ledger.init_ledger`;
docs/privacy.md). A container deployment runs that step before each SuperNode starts
(compose: service ``ledger-init-<i>``; Helm: init container ``ledger-init``), on the
node's persistent volume, every time the SuperNode is (re)started. So the step must never
reset a spent budget:

- ledger absent: created empty (epsilon 0), as ``flwr-guard ledger init`` does;
- ledger present and readable: kept untouched; its steps are printed;
- ledger present but unreadable (corrupt, another source's file): exit 1 with the
  reason, the file untouched (the SuperNode would refuse DP-SGD with the same reason;
  ``flwr-guard ledger init --force`` is the operator's deliberate choice, never this
  step's).

``init_ledger`` itself refuses to overwrite (``FileExistsError``), so two steps racing on
one volume cannot reset it either. Limit, stated: the budget is as durable as the volume;
a deleted volume (``docker compose down -v``, a deleted PersistentVolumeClaim) gives the
next start a new ledger at epsilon 0, exactly as ``flwr-guard ledger init`` on an empty
directory would.

Usage: ``python -m flwr_guard.deployment.ledger_init --dir DIR --source ID``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flwr_guard.dp.record_ledger import (
    LedgerMissing,
    RecordLedger,
    init_ledger,
    ledger_path,
)


def ensure_ledger(directory: str, source: str) -> str:
    """Create the ledger of ``source`` in ``directory`` unless it exists; say what was done.

    Returns:
        one line for the log: ``created ...`` or ``kept ... (N DP-SGD steps)``.

    Raises:
        LedgerMissing: (its subclass ``LedgerCorrupt``) the ledger exists but cannot be
            read; the file is left as it is.
        ValueError: an invalid source id (names node config ``dp-sgd-data-source``).
        OSError: the directory cannot be created or written.
    """
    path = ledger_path(directory, source)
    if path.exists():
        ledger = RecordLedger(directory, source)  # LedgerCorrupt when unreadable
        return f"kept the record-level ledger {path} ({ledger.steps} DP-SGD steps recorded)"
    try:
        created = init_ledger(directory, source)
    except FileExistsError:  # created concurrently: keep it, as above
        ledger = RecordLedger(directory, source)
        return f"kept the record-level ledger {path} ({ledger.steps} DP-SGD steps recorded)"
    return f"created the record-level ledger {created} (data source {source!r}, epsilon 0)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_guard.deployment.ledger_init",
        description="Create a SuperNode's record-level DP-SGD ledger unless it exists "
        "(never resets one).",
    )
    parser.add_argument("--dir", required=True, help="the node config's dp-sgd-ledger")
    parser.add_argument("--source", required=True, help="the node's dp-sgd-data-source "
                        "(default of a node with a partition-id: partition-<partition-id>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: the ledger exists (created or kept); 1: it could not be (reason printed)."""
    args = build_parser().parse_args(argv)
    try:
        print(ensure_ledger(args.dir, args.source), flush=True)
    except (LedgerMissing, ValueError, OSError) as err:
        print(f"ledger-init: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
