"""SecAgg+ for Flower's Message API.

Core (no Flower imports): :mod:`~flwr_guard.secagg.crypto` (pycryptodome primitives),
:mod:`~flwr_guard.secagg.prg` (mask expansion), :mod:`~flwr_guard.secagg.quantization`,
:mod:`~flwr_guard.secagg.graph` (neighbour graph), :mod:`~flwr_guard.secagg.params`,
:mod:`~flwr_guard.secagg.context`; the vocabulary both sides share:
:mod:`~flwr_guard.secagg.constants` (stage, record and key names),
:mod:`~flwr_guard.secagg.messages` (wire formats), :mod:`~flwr_guard.secagg.transcripts`
(commitments, digests, seeds), :mod:`~flwr_guard.secagg.errors`; the state machines by
role: :mod:`~flwr_guard.secagg.client` and :mod:`~flwr_guard.secagg.server` (one round),
:mod:`~flwr_guard.secagg.session_client` and :mod:`~flwr_guard.secagg.session_server`
(multi-round sessions).

Flower adapters: :func:`~flwr_guard.secagg.mod.secaggplus_mod` (client mod) and
:class:`~flwr_guard.secagg.strategy.SecAggPlus` (strategy wrapper).

Every name here is imported on first use: :mod:`~flwr_guard.secagg.constants` (the
names on Flower's messages) stays importable without NumPy, pycryptodome or Flower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr_guard.secagg.client import SecAggClient
    from flwr_guard.secagg.errors import ProtocolError
    from flwr_guard.secagg.mod import secaggplus_mod
    from flwr_guard.secagg.params import SecAggParams
    from flwr_guard.secagg.server import SecAggAborted, SecAggServer
    from flwr_guard.secagg.strategy import SecAggPlus

_MODULES = {
    "ProtocolError": "flwr_guard.secagg.errors",
    "SecAggAborted": "flwr_guard.secagg.server",
    "SecAggClient": "flwr_guard.secagg.client",
    "SecAggParams": "flwr_guard.secagg.params",
    "SecAggPlus": "flwr_guard.secagg.strategy",
    "SecAggServer": "flwr_guard.secagg.server",
    "secaggplus_mod": "flwr_guard.secagg.mod",
}

__all__ = [
    "ProtocolError",
    "SecAggAborted",
    "SecAggClient",
    "SecAggParams",
    "SecAggPlus",
    "SecAggServer",
    "secaggplus_mod",
]


def __getattr__(name: str) -> Any:
    # The core needs NumPy and pycryptodome, the adapters Flower: load them when asked for.
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(name)
