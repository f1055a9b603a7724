"""The reference app's gradient-leakage audit: :func:`flwr_guard.audit.leakage_audit_mod`
configured from the run config.

Run-config keys (``[tool.flwr.app.config]``):

- ``audit`` (bool): audit at all;
- ``audit-round-fraction``, ``audit-client-fraction``: which (round, node) pairs audit
  (:class:`flwr_guard.audit.AuditSampling`; SHA-256 draws, the same on every run);
- ``audit-effort``, ``audit-time-budget`` (seconds per audit, all attacks together);
- ``audit-gate`` (bool): refuse to send an update whose verdict is "leaks".

The protections the audit assumes are the ones this app runs with: DP-SGD
(:meth:`Protections.from_dpsgd`: one step of clipped, noised SGD as the server would
see it) and, with SecAgg+, a cohort of at least ``min-nodes`` summed before the server
sees anything. The mod is rebuilt per message from the run config (cheap: no model or
data is touched unless the round is sampled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from flwr_guard.apps.digits.data import node_partition_arrays
from flwr_guard.keys import RunConfig

if TYPE_CHECKING:
    from flwr_guard.audit import LeakageAuditConfig, Protections

# The audit's imports (torch, torchmetrics: seconds) happen only when the mod is on.


def _node_data(context: Context):
    return node_partition_arrays(context.run_config, context.node_config)


def protections_for(run_config: Mapping[str, Any]) -> Protections:
    """What the server can see of one client's update under this run config."""
    from flwr_guard.audit import Protections

    cohort = int(run_config["min-nodes"]) if bool(run_config[RunConfig.SECAGG]) else 1
    if bool(run_config[RunConfig.DP_SGD]):
        return Protections.from_dpsgd(
            max_grad_norm=float(run_config[RunConfig.DP_SGD_MAX_GRAD_NORM]),
            noise_multiplier=float(run_config[RunConfig.DP_SGD_NOISE_MULTIPLIER]),
            learning_rate=float(run_config["learning-rate"]),
            aggregate_size=max(cohort, 1),
        )
    return Protections(aggregate_size=max(cohort, 1))


def audit_config(run_config: Mapping[str, Any]) -> LeakageAuditConfig:
    """:class:`LeakageAuditConfig` for this run config."""
    from flwr_guard.audit import AuditPlan, AuditSampling, LeakageAuditConfig, LocalTraining

    return LeakageAuditConfig(
        plan=AuditPlan(
            training=LocalTraining(local_steps=1, learning_rate=float(run_config["learning-rate"])),
            protections=protections_for(run_config),
            effort=float(run_config[RunConfig.AUDIT_EFFORT]),
            time_budget_s=float(run_config[RunConfig.AUDIT_TIME_BUDGET]),
        ),
        sampling=AuditSampling(
            round_fraction=float(run_config[RunConfig.AUDIT_ROUND_FRACTION]),
            client_fraction=float(run_config[RunConfig.AUDIT_CLIENT_FRACTION]),
            seed=int(run_config["seed"]),
        ),
        gate=bool(run_config[RunConfig.AUDIT_GATE]),
        # DP-SGD clips each example's gradient inside the optimiser: the reply is a whole
        # epoch of steps, not an update clipped to one step's norm.
        check_update_norm=not bool(run_config[RunConfig.DP_SGD]),
        device="cpu",
    )


def digits_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: the leakage audit of :mod:`flwr_guard.audit` as the run config says."""
    if not bool(context.run_config.get(RunConfig.AUDIT, False)):
        return call_next(msg, context)
    from flwr_guard.apps.digits.model import DigitsCNN
    from flwr_guard.audit import leakage_audit_mod

    mod = leakage_audit_mod(DigitsCNN, _node_data, audit_config(context.run_config))
    return mod(msg, context, call_next)
