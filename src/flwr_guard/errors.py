"""The common base of every exception flwr-guard raises on purpose.

Each error class keeps the built-in class it had (``ValueError`` for bad input,
``RuntimeError`` for a refused or failed operation, ``OSError`` for a port in use), so
existing ``except ValueError`` handlers keep working, and also derives from
:class:`FlwrGuardError`, so a caller can tell flwr-guard's refusals from anything else
with one ``except FlwrGuardError`` (the layout pyca/cryptography and Opacus use).
"""

from __future__ import annotations


class FlwrGuardError(Exception):
    """Base of every exception that flwr-guard raises on purpose."""
