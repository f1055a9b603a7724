"""Which MetricRecord keys telemetry reads, and how (no Flower).

Client-side protections run in ClientApp processes that live for one message, so what
they measure travels back in the reply's MetricRecord (a flat ``str -> int | float``
mapping, the same keys on every reply for FedAvg) and the server exports it. Each
quantity below is looked up under a tuple of accepted keys, first match wins; a reply
without any of them simply does not update that family. Key owners:

- DP-SGD helper (:mod:`flwr_guard.dp.dpsgd`): record-level epsilon of the client;
- update clipping mod (:mod:`flwr_guard.dp.mods`): the unclipped bit (adaptive
  clipping), the client's weight;
- DP-FedAvg (:mod:`flwr_guard.dp.strategy`): epsilon, clipping norm and noise std in
  the aggregated train metrics;
- leakage audit mod (:mod:`flwr_guard.audit.audit_mod`): PSNR, PSNR gain over the
  mean-image baseline, SSIM, identification rate, verdict, whether this reply was
  audited or the audit failed; a blocked update arrives as an error reply;
- reply inspection (:mod:`flwr_guard.inspection.reply_mod`, ``ReplyGuard``): an error reply
  for a blocked reply; the server-side guard's findings.

A key that is present but holds a non-finite value (NaN: "not audited this round") is
treated as absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# DP
RECORD_EPSILON = ("dp-sgd-epsilon",)
RECORD_DELTA = ("dp-sgd-delta",)
UNCLIPPED_BIT = ("dp-unclipped-count",)
USER_EPSILON = ("dp-epsilon",)
CLIPPING_NORM = ("dp-clipping-norm",)
NOISE_STD = ("dp-noise-std",)
# The DP-noised unclipped fraction, if the DP wrapper reports it (safe to export).
NOISED_UNCLIPPED_FRACTION = ("dp-unclipped-fraction",)
WRAPAROUNDS = ("dp-wraparounds", "secagg-wraparounds")

# Leakage audit (flwr_guard.audit.report.AuditReport.to_metrics / neutral_metrics):
# every train reply carries the keys; audit-ran = 0 marks a reply that was not audited.
AUDITED = ("audit-ran",)
AUDIT_ERROR = ("audit-error",)
PSNR = ("audit-psnr-db",)
PSNR_GAIN = ("audit-psnr-gain-db",)
SSIM = ("audit-ssim",)
IDENTIFICATION = ("audit-identified-rate",)
LEAK = ("audit-leaks",)
# The audit gate turns a leaking update into an error reply whose reason starts so
# (flwr_guard.audit.audit_mod.BLOCKED_REASON).
BLOCKED_REASON_PREFIX = "flwr-guard audit: update blocked"
# An audit that could not run refuses the update (on_failure="refuse"): the error reply's
# reason holds this (flwr_guard.audit.audit_mod.AUDIT_FAILED); it counts as an audit error.
AUDIT_FAILED_MARK = "leakage audit failed:"

# Reply inspector: a reply the client-side inspection blocked arrives as an error reply
# whose reason starts so (flwr_guard.inspection.reply_mod.BLOCKED_REASON); the server-side
# ReplyGuard keeps its findings per round (read by the adapter). A count a client puts in
# its own reply is read too.
INSPECTOR_VIOLATIONS = ("inspector-violations",)
INSPECTOR_REASON_PREFIX = "flwr-guard reply inspection"

# Training progress, by phase (aggregated train / evaluate metrics, server evaluation).
LOSS = {
    "train": ("train-loss", "train_loss", "loss"),
    "evaluate": ("eval-loss", "eval_loss", "evaluate-loss", "loss"),
    "server": ("test-loss", "test_loss", "eval-loss", "loss"),
}
ACCURACY = {
    "evaluate": ("eval-acc", "eval-accuracy", "eval_acc", "accuracy"),
    "server": ("test-accuracy", "test-acc", "test_accuracy", "accuracy"),
}


def lookup(record: Mapping[str, Any] | None, keys: tuple[str, ...]) -> float | None:
    """The first finite number stored under one of ``keys``, else ``None``.

    Lists (Flower allows ``list[float]`` values) and non-numbers are ignored: telemetry
    never exports a list from a client, which could carry per-example data.
    """
    if not record:
        return None
    for key in keys:
        value = record.get(key)
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None
