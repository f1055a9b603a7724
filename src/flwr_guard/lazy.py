"""Lazy package exports (PEP 562), one implementation for every flwr_guard package.

A package's ``__init__`` maps each public name to the module that defines it and sets
``__getattr__ = lazy_getattr(__name__, EXPORTS)``: the module is imported the first
time the name is read. A ClientApp process that only runs a SecAgg+ stage or inspects a
reply then never imports torch, torchmetrics or Opacus (seconds each).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that resolves ``exports``
    (``{public name: defining module}``) on first use.

    The returned function raises ``AttributeError`` (naming ``package``) for any other
    name, as a module without the hook would.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
