"""flwr-guard: protect what Flower clients share.

Secure aggregation (SecAgg+), differential privacy, gradient-leakage audits and
Prometheus telemetry for Flower's Message API (``flwr.clientapp`` /
``flwr.serverapp``). The documented way in is a façade on each side::

    from flwr_guard import ClientGuard, ClientPolicy          # ClientApp
    from flwr_guard import GuardedStrategy, SecAgg, CentralDP  # ServerApp

See the project README and ``docs/`` (quickstart, architecture, threat model).
"""

from typing import Any

from flwr_guard.errors import FlwrGuardError

__version__ = "0.1.0"

# The façades load on first use (PEP 562): a ClientApp process that only answers a
# SecAgg+ stage must not import torch.
_FACADES = {
    "ClientGuard": "flwr_guard.guard.client",
    "LeakageAudit": "flwr_guard.guard.client",
    "ClientPolicy": "flwr_guard.guard.policy",
    "GuardedStrategy": "flwr_guard.guard.strategy",
    "SecAgg": "flwr_guard.guard.strategy",
    "CentralDP": "flwr_guard.guard.strategy",
    "DistributedDP": "flwr_guard.guard.strategy",
    "DPSGDConfig": "flwr_guard.dp.dpsgd",
}

__all__ = ["FlwrGuardError", "__version__", *_FACADES]


def __getattr__(name: str) -> Any:
    if name in _FACADES:
        import importlib

        return getattr(importlib.import_module(_FACADES[name]), name)
    raise AttributeError(f"module 'flwr_guard' has no attribute {name!r}")
