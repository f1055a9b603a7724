"""The one device resolver of flwr-guard (training, DP-SGD, the audit, robustness).

``resolve_device("auto")`` (or ``None`` / ``""``) is CUDA when available, else CPU. A
node configured with ``device = "cuda"`` that has no CUDA trains on CPU with a warning
(``fallback=True``, what a ClientApp wants: the node config is the operator's wish, the
hardware is what it is); a command-line tool asked for CUDA explicitly raises instead
(``fallback=False``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def resolve_device(requested: str | torch.device | None = None, *, fallback: bool = True
                   ) -> torch.device:
    """The ``torch.device`` for ``requested`` (see the module docstring).

    Raises:
        ValueError: CUDA asked for and unavailable with ``fallback=False``.
        RuntimeError: a device string torch does not understand (from ``torch.device``).
    """
    import torch

    if requested is None or str(requested) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        if not fallback:
            raise ValueError(f"device {str(requested)!r} asked for but CUDA is not available")
        logger.warning("device %r requested but CUDA is not available: using CPU", str(requested))
        return torch.device("cpu")
    return device
