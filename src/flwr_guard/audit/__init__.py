"""Gradient-leakage audit: attack what clients share, score it against their own data.

Core (no Flower imports): the inputs it accepts (:mod:`inputs`: images, vectors,
tokens, dict batches), the attacks (:mod:`dlg`, :mod:`inverting_gradients`, the
closed-form :mod:`analytic`, the text :mod:`token_attack`, the registry in
:mod:`suite`), the trap-model check (:mod:`trap_check`), the update model (:mod:`update`, :mod:`protections`), the
scores (:mod:`scores`, :mod:`baselines`, :mod:`verdict`, :mod:`report`), one audit
(:mod:`audit`) and the sweep behind ``flwr-guard audit`` (:mod:`sweep`). Reply and
endpoint inspection, a protection of its own, is :mod:`flwr_guard.inspection`.

Flower adapters:
:func:`leakage_audit_mod` and :class:`LeakageAuditConfig` (client mod),
:func:`trap_check_mod` (client mod: refuses a malformed or trap model before training),
:class:`AuditSummary` (strategy wrapper). See docs/audit.md.
"""

from __future__ import annotations

from flwr_guard.lazy import lazy_getattr

# Every name loads on first use (PEP 562): the core pulls in torch and torchmetrics
# (seconds of imports), which a ClientApp process that only inspects a reply, or runs a
# SecAgg+ stage, must not pay.
_EXPORTS = {
    "AuditPlan": "flwr_guard.audit.audit",
    "run_audit": "flwr_guard.audit.audit",
    "SigmoidLeNet": "flwr_guard.audit.lenet",
    "Protections": "flwr_guard.audit.protections",
    "AuditReport": "flwr_guard.audit.report",
    "AuditSampling": "flwr_guard.audit.sampling",
    "LocalTraining": "flwr_guard.audit.update",
    "VerdictRule": "flwr_guard.audit.verdict",
    "UnsupportedAuditInput": "flwr_guard.audit.inputs",
    "AnalyticAttack": "flwr_guard.audit.analytic",
    "TrapCheckConfig": "flwr_guard.audit.trap_check",
    "check_model": "flwr_guard.audit.trap_check",
    # Flower adapters
    "leakage_audit_mod": "flwr_guard.audit.audit_mod",
    "LeakageAuditConfig": "flwr_guard.audit.audit_mod",
    "trap_check_mod": "flwr_guard.audit.trap_mod",
    "AuditSummary": "flwr_guard.audit.summary",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
