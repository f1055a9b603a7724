"""SecAgg+ for Flower's Message API.

Core (no Flower imports): :mod:`~flwr_guard.secagg.crypto` (pycryptodome primitives),
:mod:`~flwr_guard.secagg.prg` (mask expansion), :mod:`~flwr_guard.secagg.quantization`,
:mod:`~flwr_guard.secagg.graph` (neighbour graph), :mod:`~flwr_guard.secagg.params`,
:mod:`~flwr_guard.secagg.context`, :mod:`~flwr_guard.secagg.client` and
:mod:`~flwr_guard.secagg.server` (the two state machines).

Flower adapters: :func:`~flwr_guard.secagg.mod.secaggplus_mod` (client mod) and
:class:`~flwr_guard.secagg.strategy.SecAggPlus` (strategy wrapper); imported lazily
so the core stays usable without Flower.
"""

from typing import Any

from flwr_guard.secagg.client import ProtocolError, SecAggClient
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.server import SecAggAborted, SecAggServer

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
    # The Flower adapters import flwr; load them only when asked for.
    if name == "SecAggPlus":
        from flwr_guard.secagg.strategy import SecAggPlus

        return SecAggPlus
    if name == "secaggplus_mod":
        from flwr_guard.secagg.mod import secaggplus_mod

        return secaggplus_mod
    raise AttributeError(name)
