"""The façades: protections declared once on each side, checked on both.

- Client: :class:`ClientGuard` (the mods in the one valid order) with its
  :class:`ClientPolicy` (what the client requires of the server).
- Server: :class:`GuardedStrategy` (the wrappers in the one valid order) with
  :class:`SecAgg`, :class:`CentralDP`, :class:`DistributedDP`; it sends a
  :class:`ProtectionManifest` with every train message.

The core (:mod:`~flwr_guard.guard.manifest`, :mod:`~flwr_guard.guard.policy`) has no
Flower imports; the adapters load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from flwr_guard.guard.manifest import ManifestError, ProtectionManifest
from flwr_guard.guard.policy import ClientPolicy

_ADAPTERS = {
    "ClientGuard": "flwr_guard.guard.client",
    "LeakageAudit": "flwr_guard.guard.client",
    "policy_mod": "flwr_guard.guard.client_mod",
    "POLICY_REFUSAL": "flwr_guard.guard.client_mod",
    "GuardedStrategy": "flwr_guard.guard.strategy",
    "SecAgg": "flwr_guard.guard.strategy",
    "CentralDP": "flwr_guard.guard.strategy",
    "DistributedDP": "flwr_guard.guard.strategy",
    "GuardConfigError": "flwr_guard.guard.strategy",
    "NoAggregate": "flwr_guard.guard.strategy",
    "GuardMismatch": "flwr_guard.guard.round_log",
}

__all__ = ["ClientPolicy", "ManifestError", "ProtectionManifest", *_ADAPTERS]


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        return getattr(importlib.import_module(_ADAPTERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
