"""The node operator's guard: the node's policy enforced around any ClientApp.

A SuperNode started under the guard (``flwr-guard node start ...``, or
``flower-supernode --isolation process`` plus ``flwr-guard node superexec``) runs every
ClientApp the server sends inside flwr-guard's own ClientApp process
(:mod:`flwr_guard.node.runner`): the FAB is checked against the node's allow-list
(:mod:`~flwr_guard.node.allowlist`, :mod:`~flwr_guard.node.fab_signature`), the
node's policy mods run outermost (:mod:`~flwr_guard.node.policy`), the app runs in a
separate child process (:mod:`~flwr_guard.node.app_process`), and each round leaves
one line in the node's log (:mod:`~flwr_guard.node.round_log`). See docs/deploy.md
("The node guard") and docs/threat-model.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: the app's child process imports flwr_guard.node.frames and nothing of the
# guard's policy, SecAgg+ or DP code.
_EXPORTS = {
    "AllowList": "flwr_guard.node.allowlist",
    "AllowListError": "flwr_guard.node.allowlist",
    "fab_hash": "flwr_guard.node.allowlist",
    "FabSignatureError": "flwr_guard.node.fab_signature",
    "sign_app_dir": "flwr_guard.node.fab_signature",
    "verify_fab": "flwr_guard.node.fab_signature",
    "NodePolicy": "flwr_guard.node.policy",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
