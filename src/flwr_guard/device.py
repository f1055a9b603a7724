"""The one device resolver of flwr-guard (training, DP-SGD, the audit, robustness), and
the CPU settings of the audit's and the robustness work's small models.

``resolve_device("auto")`` (or ``None`` / ``""``) is CUDA when available, else CPU. A
node configured with ``device = "cuda"`` that has no CUDA trains on CPU with a warning
(``fallback=True``, what a ClientApp wants: the node config is the operator's wish, the
hardware is what it is); a command-line tool asked for CUDA explicitly raises instead
(``fallback=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


@contextmanager
def cpu_settings(device: str | torch.device, threads: int | None, *,
                 disable_onednn: bool = True) -> Iterator[None]:
    """On CPU: ``threads`` torch intra-op threads (``None``: leave the count as is) and,
    with ``disable_onednn``, oneDNN (mkldnn) kernels off; both restored on exit. On any
    other device nothing changes.

    Why: on a shared CPU, PGD-40 on 128 digits with the reference CNN took 0.8 s with one
    torch thread and oneDNN off, against 17.6 s with two threads and oneDNN on (measured
    on 2 cores at load ~9): thread spinning and oneDNN's set-up dominate 8x8 convolutions,
    and oneDNN's convolutions are about 2x slower than PyTorch's own on 8x8-28x28 inputs.
    """
    import torch

    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.backends.mkldnn.flags(enabled=False) if disable_onednn else nullcontext():
            yield
    finally:
        torch.set_num_threads(previous)
