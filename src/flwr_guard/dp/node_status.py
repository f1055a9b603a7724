"""What a node shows of its DP policy: the policy digest and the ledger's epsilon (no Flower).

For the node's own log line and exporter (one line per round): :func:`node_dp_status`
reads the node config (the operator's policy, library defaults filled in) and the
record-level ledger of the node's data source, without writing anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr_guard.dp.node_policy import (
    data_source,
    dpsgd_max_epsilon,
    policy_digest,
)
from flwr_guard.dp.record_ledger import LedgerMissing, RecordLedger, default_ledger_dir
from flwr_guard.keys import NodeConfig

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class NodeDPStatus:
    """The node's DP state for one log line.

    Attributes:
        policy_digest: :func:`flwr_guard.dp.node_policy.policy_digest` (16 hex digits).
        source: the data source the ledger accounts for.
        ledger: path of the ledger file.
        steps: DP-SGD steps in the ledger (0 when it cannot be read).
        epsilon: record-level epsilon spent at ``delta`` (Opacus, the ledger's
            accountant), ``None`` when the ledger is missing or unreadable.
        max_epsilon: the budget the node enforces (node config or library default).
        delta: the delta of ``epsilon`` (the one the last round was checked with).
        accountant: ``"rdp"`` or ``"prv"``.
        error: why the ledger could not be read (it names ``flwr-guard ledger init``).
    """

    policy_digest: str
    source: str
    ledger: str
    steps: int
    epsilon: float | None
    max_epsilon: float
    delta: float
    accountant: str
    error: str | None = None

    def line(self) -> str:
        """``dp policy <digest>, record-level epsilon 3.07 of 8 at delta 1e-05 (rdp,
        add/remove one record; data source partition-0)``."""
        head = f"dp policy {self.policy_digest}"
        if self.epsilon is None:
            return f"{head}, record-level ledger unusable: {self.error}"
        return (f"{head}, record-level epsilon {self.epsilon:.4g} of {self.max_epsilon:g} at "
                f"delta {self.delta:g} ({self.accountant}, add/remove one record; data source "
                f"{self.source}, {self.steps} steps)")


def node_dp_status(node_config: Mapping[str, Any]) -> NodeDPStatus:
    """The node's policy digest and its ledger's epsilon spent of its budget.

    Never writes and never raises for a missing or corrupt ledger (``error`` says so);
    a malformed node-config value raises ``ValueError`` naming the key.
    """
    from flwr_guard.dp.dpsgd import opacus_epsilon  # Opacus: only when asked

    directory = str(node_config.get(NodeConfig.DP_SGD_LEDGER, "") or "") or str(default_ledger_dir())
    source = data_source(node_config)
    digest, budget = policy_digest(node_config), dpsgd_max_epsilon(node_config)
    try:
        ledger = RecordLedger(directory, source)
    except (LedgerMissing, ValueError) as err:
        return NodeDPStatus(digest, source, directory, 0, None, budget, DEFAULT_DELTA, "rdp",
                            str(err))
    delta = float(ledger.meta.get("delta", DEFAULT_DELTA))
    accountant = str(ledger.meta.get("accountant", "rdp"))
    return NodeDPStatus(digest, source, str(ledger.path), ledger.steps,
                        opacus_epsilon(ledger.history, delta, accountant), budget, delta,
                        accountant)
