"""Robustness metric families and how round data updates them (no Flower imports).

Registered in every :class:`~flwr_guard.telemetry.metrics.GuardMetrics` next to the
core families (:data:`ROBUST_FAMILIES`), set by :func:`record_robustness`, which
:meth:`TelemetryRecorder.progress` calls with each phase's metrics:

- ``phase == "server"``: the server's robustness evaluation
  (:class:`flwr_guard.robust.server_eval.RobustnessEvaluator`): keys
  ``robust-acc-<attack>-<eps>``, ``robust-masking-suspected``,
  ``robust-attr-<method>-<score>``, ``robust-eval-seconds``;
- ``phase == "train"``: the clients' aggregated ``robust-train-seconds-per-step``.

Labels stay low-cardinality: ``attack`` (none, fgsm, pgd, spsa, square), ``eps`` (the
configured radii, a handful), ``method`` (4) and ``score`` (6). docs/metrics.md lists
the families; docs/robustness.md what they mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr_guard.keys import ReplyMetrics, ServerMetrics
from flwr_guard.telemetry.family import Family, family

if TYPE_CHECKING:
    from flwr_guard.telemetry.recorder import TelemetryRecorder


_f = family

ROBUST_FAMILIES: tuple[Family, ...] = (
    _f("robust_accuracy_ratio", "gauge", "ratio in [0, 1]", ("attack", "eps"),
       "Accuracy of the global model on the server's held-out examples under each attack at "
       "L-inf radius eps (pixels in [0, 1]); attack=none, eps=0: clean accuracy of the same "
       "examples; eps=1: unbounded PGD."),
    _f("robust_masking_suspected", "gauge", "boolean (0/1)", (),
       "1 if the last robustness evaluation's gradient-masking detector fired (a paired check "
       "of Athalye et al. / Carlini et al. found a sign of masked gradients)."),
    _f("robust_evaluations_total", "counter", "evaluations", (),
       "Robustness evaluations the server ran (every k rounds)."),
    _f("robust_evaluation_seconds", "gauge", "seconds", (),
       "Wall-clock time of the last robustness evaluation (attacks and attribution scores)."),
    _f("robust_attribution_score", "gauge", "score (see docs/robustness.md)", ("method", "score"),
       "Faithfulness / robustness score of each attribution method on the global model: "
       "deletion_auc, insertion_auc, infidelity, max_sensitivity, topk_intersection, "
       "randomisation_spearman."),
    _f("robust_training_step_seconds", "gauge", "seconds", (),
       "Clients' mean wall-clock time per local training step with the robust objective "
       "(weighted by examples, last round)."),
)

_ACC = re.compile(rf"^{re.escape(ServerMetrics.ROBUST_ACCURACY_PREFIX)}(none|fgsm|pgd|spsa|square)-([0-9.]+)$")
_ATTR = re.compile(rf"^{re.escape(ServerMetrics.ROBUST_ATTRIBUTION_PREFIX)}([a-z+]+)-([a-z_]+)$")


def record_robustness(recorder: TelemetryRecorder, phase: str, record: Mapping[str, Any] | None) -> None:
    """Update the robustness families from ``record`` (a MetricRecord-like mapping);
    keys that are absent leave their family untouched, non-finite values are skipped."""
    if not record:
        return
    values = {k: float(v) for k, v in record.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))}
    if phase == "train":
        if ReplyMetrics.ROBUST_TRAIN_SECONDS_PER_STEP in values:
            recorder._labels("robust_training_step_seconds").set(values[ReplyMetrics.ROBUST_TRAIN_SECONDS_PER_STEP])
        return
    if phase != "server" or not any(k.startswith(ServerMetrics.ROBUST_ACCURACY_PREFIX) for k in values):
        return
    for key, value in values.items():
        if m := _ACC.match(key):
            recorder._labels("robust_accuracy_ratio", attack=m[1], eps=f"{float(m[2]):g}").set(value)
        elif m := _ATTR.match(key):
            recorder._labels("robust_attribution_score", method=m[1], score=m[2]).set(value)
    if ServerMetrics.ROBUST_MASKING_SUSPECTED in values:
        recorder._labels("robust_masking_suspected").set(values[ServerMetrics.ROBUST_MASKING_SUSPECTED])
    if ServerMetrics.ROBUST_EVAL_SECONDS in values:
        recorder._labels("robust_evaluation_seconds").set(values[ServerMetrics.ROBUST_EVAL_SECONDS])
    recorder._labels("robust_evaluations").inc()
