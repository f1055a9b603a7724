"""CPU settings for the small models of the robustness work (no Flower imports).

On a shared CPU, PGD-40 on 128 digits with the reference CNN took 0.8 s with one torch
thread and oneDNN (mkldnn) convolutions off, against 17.6 s with two threads and oneDNN
on (measured here, load ~9 on 2 cores): thread spinning and oneDNN's set-up dominate
8x8 convolutions. The audit (:mod:`flwr_guard.audit.audit`) made the same choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_settings(device: torch.device | str, threads: int | None) -> Iterator[None]:
    """On CPU with ``threads`` set: that many torch threads and oneDNN off, restored after.
    On other devices, or with ``threads=None``, nothing changes."""
    if torch.device(device).type != "cpu" or threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.backends.mkldnn.flags(enabled=False):  # restores oneDNN's previous state
            yield
    finally:
        torch.set_num_threads(previous)
