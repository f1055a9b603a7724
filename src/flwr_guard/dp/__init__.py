"""Differential privacy for Flower apps.

Core (no Flower imports): :mod:`~flwr_guard.dp.accounting` (epsilon over dp-accounting),
:mod:`~flwr_guard.dp.skellam_accounting` (Skellam's own RDP, a generic subsampling bound),
:mod:`~flwr_guard.dp.budget` (a budget that refuses what it cannot afford),
:mod:`~flwr_guard.dp.record_ledger` (DP-SGD's durable node-local ledger),
:mod:`~flwr_guard.dp.node_policy` (the node operator's floors and their library defaults),
:mod:`~flwr_guard.dp.node_status` (the node's policy digest and epsilon, for its log),
:mod:`~flwr_guard.dp.relation_accounting` (distributed DP under add/remove of a client),
:mod:`~flwr_guard.dp.distributed_client` (the client's distributed-DP floors and noise),
:mod:`~flwr_guard.dp.clipping` (fixed and adaptive update clipping),
:mod:`~flwr_guard.dp.central` (Gaussian noise on the mean),
:mod:`~flwr_guard.dp.distributed` and :mod:`~flwr_guard.dp.rotation` (Skellam noise in
the quantised domain), :mod:`~flwr_guard.dp.dpsgd` (record-level DP-SGD over Opacus).

Flower adapters: :mod:`~flwr_guard.dp.mods` (client train mods),
:mod:`~flwr_guard.dp.strategy` (the ``DPFedAvg`` strategy wrapper),
:mod:`~flwr_guard.dp.context_state` (Opacus accountant in ``context.state``).
The adapters are imported lazily, so importing the core never imports Flower.
See docs/privacy.md for how to wire them into a ClientApp and a ServerApp.
"""

from __future__ import annotations

from flwr_guard.lazy import lazy_getattr

# Every name is imported on first use: a deployed ClientApp process lives for one
# message, and the SecAgg+ control stages only need flwr_guard.keys; the accountant
# (dp-accounting, which imports scipy.stats) cost ~1.5 s of each such process
# (benchmarks/deployment.py, docs/demo.md).
_LAZY = {
    "StepLedger": "flwr_guard.dp.accounting",
    "Step": "flwr_guard.dp.accounting",
    "compute_epsilon": "flwr_guard.dp.accounting",
    "epsilon_of_steps": "flwr_guard.dp.accounting",
    "noise_multiplier_for_epsilon": "flwr_guard.dp.accounting",
    "BudgetDecision": "flwr_guard.dp.budget",
    "PrivacyBudget": "flwr_guard.dp.budget",
    "PrivacyBudgetExceeded": "flwr_guard.dp.budget",
    "LedgerMissing": "flwr_guard.dp.record_ledger",
    "LedgerCorrupt": "flwr_guard.dp.record_ledger",
    "RecordLedger": "flwr_guard.dp.record_ledger",
    "init_ledger": "flwr_guard.dp.record_ledger",
    "enforced_policy": "flwr_guard.dp.node_policy",
    "policy_digest": "flwr_guard.dp.node_policy",
    "node_dp_status": "flwr_guard.dp.node_status",
    "update_clipping_mod": "flwr_guard.dp.mods",
    "DPFedAvg": "flwr_guard.dp.strategy",
    "DPConfigurationError": "flwr_guard.dp.strategy",
    "DPSGD": "flwr_guard.dp.dpsgd",
    "DPSGDConfig": "flwr_guard.dp.dpsgd",
    "load_accountant_state": "flwr_guard.dp.context_state",
    "save_accountant_state": "flwr_guard.dp.context_state",
    "dpsgd_from_context": "flwr_guard.dp.context_state",
    "save_dpsgd": "flwr_guard.dp.context_state",
}

__all__ = [*_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
