"""The node operator's policy as the node guard enforces it around any app.

Built from the SuperNode's node config only (never from the run config or the app):

- the FAB allow-list (:class:`~flwr_guard.node.allowlist.AllowList`);
- the client policy (:class:`~flwr_guard.guard.policy.ClientPolicy` from the
  ``guard-*`` keys), with one difference to an app's own ``ClientGuard``: under the
  node guard SecAgg+ is required unless the operator sets ``guard-require-secagg=false``
  (an app that never imports flwr-guard would otherwise send its update in the clear);
- the mods, outermost first, that :meth:`NodePolicy.train_mods` returns: the existing
  ``ClientGuard`` chain (policy mod, SecAgg+ mod, reply inspection, update clipping;
  distributed noise is added inside the SecAgg+ mod under the node's floors, see
  :mod:`flwr_guard.dp.distributed_client`) with the structural trap check on the
  received model right inside the SecAgg+ mod, before the app trains
  (:mod:`flwr_guard.node.trap_structure`; ``guard-trap-check=false`` turns it off).
  Nothing is re-implemented here.

Only ``train`` and ``evaluate`` messages reach the app; a ``query`` (or any other type)
is refused: the reply inspector knows what a train or evaluate reply may carry, not what
an arbitrary query may.

Record-level DP-SGD cannot be imposed from outside the app (it lives in the training
loop); ``guard-require-dp = "distributed"`` (or ``"central"``) with
``guard-min-noise-multiplier`` and ``guard-max-clipping-norm`` make user-level
protection (clipping + noise) a condition of every train reply instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr_guard.guard.policy import NODE_REQUIRE_SECAGG, ClientPolicy
from flwr_guard.node.allowlist import AllowList

#: Message types the node guard lets the app answer (the part before any ``.action``).
ANSWERED_TYPES = ("train", "evaluate")


@dataclass(frozen=True)
class NodePolicy:
    """What the node enforces around every app (see the module docstring).

    Attributes:
        client: the client policy (floors checked against the server's manifest).
        allowlist: which FABs may run.
        inspect_replies: block replies that carry more than the update and scalar
            metrics (always on under the node guard).
    """

    client: ClientPolicy
    allowlist: AllowList
    inspect_replies: bool = True
    trap_check: bool = True

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """The node's policy.

        Raises:
            ValueError: a policy key or allow-list that does not parse (the message
                names the key).
        """
        from flwr_guard.node.trap_structure import NODE_TRAP_CHECK

        config = {NODE_REQUIRE_SECAGG: True, **node_config}
        trap = node_config.get(NODE_TRAP_CHECK, True)
        if isinstance(trap, str) and trap.lower() in ("true", "false"):
            trap = trap.lower() == "true"
        if not isinstance(trap, bool):
            raise ValueError(f"node config {NODE_TRAP_CHECK} must be true or false, got {trap!r}")
        return cls(ClientPolicy.from_node_config(config), AllowList.from_node_config(node_config),
                   trap_check=trap)

    def train_mods(self) -> list[Any]:
        """The enforcement mods for a train message, outermost first (``ClientGuard``'s)."""
        from flwr_guard.guard.client import ClientGuard

        mods = ClientGuard(self.client, inspect_replies=self.inspect_replies).train_mods()
        if self.trap_check:  # inside the SecAgg+ mod: it sees the masked-input's model
            from flwr_guard.node.trap_structure import structural_trap_mod
            from flwr_guard.secagg.mod import secaggplus_mod

            mods.insert(mods.index(secaggplus_mod) + 1, structural_trap_mod())
        return mods

    def other_mods(self) -> list[Any]:
        """The mods for an evaluate message: reply inspection only (no model leaves)."""
        from flwr_guard.inspection.reply_mod import reply_inspection_mod

        return [reply_inspection_mod()]

    def describe(self) -> dict[str, Any]:
        """The policy as plain values (what the digest covers)."""
        c = self.client
        return {"secagg": c.secagg, "dp": c.dp, "min-noise-multiplier": c.min_noise_multiplier,
                "max-clipping-norm": c.max_clipping_norm, "dp-sgd": c.dpsgd,
                "inspect-replies": self.inspect_replies, "allowlist": self.allowlist.digest(),
                "trap-check": self.trap_check,
                "answered": list(ANSWERED_TYPES)}

    def digest(self) -> str:
        """16 hex digits of SHA-256 over :meth:`describe` (for the node's log line)."""
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
