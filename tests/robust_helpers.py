"""Shared pieces of the tests/test_robust_* files: the digits data and a trained CNN."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, TensorDataset


@functools.cache
def digits(split: str = "train"):
    """scikit-learn's digits as ``(x float32 (N, 1, 8, 8) in [0, 1], y int64)``, a fixed
    80/20 split (1437 / 360)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    idx = order[:1437] if split == "train" else order[1437:]
    return x[idx], y[idx]


@functools.cache
def trained_cnn(epochs: int = 5, seed: int = 0):
    """The reference app's DigitsCNN trained plainly (SGD, momentum 0.9): ~96% test accuracy."""
    from flwr_guard.apps.digits.model import DigitsCNN
    from flwr_guard.robust.objectives import RobustObjective, train_robust_epochs

    torch.manual_seed(seed)
    model = DigitsCNN()
    x, y = digits("train")
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    train_robust_epochs(model, loader, RobustObjective("plain"), epochs, 0.1, 0.9, torch.device("cpu"),
                        cpu_threads=1)
    return model.eval()
