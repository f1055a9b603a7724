"""Gradient-leakage audit: attack what clients share, score it against their own data.

Core (no Flower imports): the attacks (:mod:`dlg`, :mod:`inverting_gradients`, the
registry in :mod:`suite`), the update model (:mod:`update`, :mod:`protections`), the
scores (:mod:`scores`, :mod:`baselines`, :mod:`verdict`, :mod:`report`), one audit
(:mod:`audit`), the reply inspector (:mod:`inspection`), the endpoint audit
(:mod:`endpoints`) and the sweep behind ``flwr-guard audit`` (:mod:`sweep`).

Flower adapters (imported on first use, so the core loads without Flower):
:func:`leakage_audit_mod` and :class:`LeakageAuditConfig` (client mod),
:func:`reply_inspection_mod` (client mod), :class:`ReplyGuard` and
:class:`AuditSummary` (strategy wrappers). See docs/audit.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from flwr_guard.audit.audit import AuditPlan, run_audit
from flwr_guard.audit.inspection import Finding, ReplyLimits, inspect_reply
from flwr_guard.audit.lenet import SigmoidLeNet
from flwr_guard.audit.protections import Protections
from flwr_guard.audit.report import AuditReport
from flwr_guard.audit.sampling import AuditSampling
from flwr_guard.audit.update import LocalTraining
from flwr_guard.audit.verdict import VerdictRule

_ADAPTERS = {
    "leakage_audit_mod": "flwr_guard.audit.audit_mod",
    "LeakageAuditConfig": "flwr_guard.audit.audit_mod",
    "reply_inspection_mod": "flwr_guard.audit.reply_mod",
    "ReplyGuard": "flwr_guard.audit.reply_guard",
    "AuditSummary": "flwr_guard.audit.summary",
}

__all__ = [
    "AuditPlan",
    "AuditReport",
    "AuditSampling",
    "Finding",
    "LocalTraining",
    "Protections",
    "ReplyLimits",
    "SigmoidLeNet",
    "VerdictRule",
    "inspect_reply",
    "run_audit",
    *_ADAPTERS,
]


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        return getattr(importlib.import_module(_ADAPTERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
