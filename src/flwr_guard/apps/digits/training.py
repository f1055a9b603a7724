"""Local training and evaluation loops of the reference app (plain PyTorch)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from flwr_guard.device import resolve_device

if TYPE_CHECKING:
    from flwr_guard.dp.dpsgd import DPSGD

logger = logging.getLogger(__name__)


def select_device(requested: str = "cpu") -> torch.device:
    """The node's training device (:func:`flwr_guard.device.resolve_device`: "cpu",
    "cuda", "cuda:N"; CUDA asked for on a node without it falls back to CPU)."""
    return resolve_device(requested)


def _run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Any,
    loader: DataLoader,
    epochs: int,
    device: torch.device,
) -> float:
    """The SGD loop shared by plain and DP-SGD training; the last epoch's mean loss."""
    total, count = 0.0, 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for images, labels in loader:
            if labels.shape[0] == 0:  # Poisson sampling can draw an empty batch
                continue
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(module(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * labels.shape[0]
            count += labels.shape[0]
    return total / max(count, 1)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    learning_rate: float,
    momentum: float,
    device: torch.device,
) -> float:
    """Train ``model`` in place with SGD; return the mean cross-entropy of the last epoch."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    return _run_epochs(model, optimizer, nn.CrossEntropyLoss(), loader, epochs, device)


def train_dpsgd_epochs(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    learning_rate: float,
    momentum: float,
    device: torch.device,
    dpsgd: DPSGD,
) -> float:
    """Train ``model`` in place with DP-SGD (Opacus: Poisson sampling, per-example
    clipping, Gaussian noise) through ``dpsgd``; return the last epoch's mean loss.

    ``dpsgd`` carries the node's accountant across rounds (see
    :mod:`flwr_guard.dp.context_state`); call ``make_private`` once per process.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    private = dpsgd.make_private(model, optimizer, loader)
    return _run_epochs(private.module, private.optimizer, private.criterion,
                       private.data_loader, epochs, device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy in [0, 1]) of ``model`` on ``loader``."""
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += criterion(logits, labels).item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.shape[0]
    return loss / max(count, 1), correct / max(count, 1)
