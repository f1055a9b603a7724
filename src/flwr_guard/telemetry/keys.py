"""Which MetricRecord keys telemetry reads, and how (no Flower).

The key strings are :mod:`flwr_guard.keys`' (``ReplyMetrics``, ``ServerMetrics``); this
module holds only telemetry's lookup logic: the keys accepted for each quantity, in order.

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

from flwr_guard.keys import ReplyMetrics, ServerMetrics

# DP
RECORD_EPSILON = (ReplyMetrics.DP_SGD_EPSILON,)
RECORD_DELTA = (ReplyMetrics.DP_SGD_DELTA,)
UNCLIPPED_BIT = (ReplyMetrics.DP_UNCLIPPED_COUNT,)
USER_EPSILON = (ServerMetrics.DP_EPSILON,)
CLIPPING_NORM = (ServerMetrics.DP_CLIPPING_NORM,)
NOISE_STD = (ServerMetrics.DP_NOISE_STD,)
# The DP-noised unclipped fraction, if the DP wrapper reports it (safe to export).
NOISED_UNCLIPPED_FRACTION = (ServerMetrics.DP_UNCLIPPED_FRACTION,)
WRAPAROUNDS = (ServerMetrics.DP_WRAPAROUNDS, ServerMetrics.SECAGG_WRAPAROUNDS)

# Leakage audit (flwr_guard.audit.report.AuditReport.to_metrics / neutral_metrics):
# every train reply carries the keys; audit-ran = 0 marks a reply that was not audited.
AUDITED = (ReplyMetrics.AUDIT_RAN,)
AUDIT_ERROR = (ReplyMetrics.AUDIT_ERROR,)
PSNR = (ReplyMetrics.AUDIT_PSNR_DB,)
PSNR_GAIN = (ReplyMetrics.AUDIT_PSNR_GAIN_DB,)
SSIM = (ReplyMetrics.AUDIT_SSIM,)
IDENTIFICATION = (ReplyMetrics.AUDIT_IDENTIFIED_RATE,)
LEAK = (ReplyMetrics.AUDIT_LEAKS,)
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
INSPECTOR_VIOLATIONS = (ReplyMetrics.INSPECTOR_VIOLATIONS,)
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
