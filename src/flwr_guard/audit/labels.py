"""Label inference from the last layer's gradient.

For cross-entropy on softmax outputs the gradient of the last linear layer's bias is
``mean_i (p_i − y_i)``, and each row ``c`` of its weight gradient is
``mean_i (p_ic − y_ic) h_i`` with ``h_i`` the layer's input. A class present in the
batch pulls its entry negative.

- One sample: iDLG (Zhao et al., "iDLG: Improved Deep Leakage from Gradients", 2020,
  Sec. 3.1): the label is the class whose entry is negative — the minimum.
- A batch: the negative entries give the classes present (Wainakh et al., "User-Level
  Label Leakage from Gradients in Federated Learning", PETS 2022, Sec. 4, "LLG"); the
  counts are shared out in proportion to how negative each entry is (largest-remainder
  rounding). This rule only uses signs and ratios, so it survives clipping, which
  rescales the whole update.

The inputs are gradient-equivalent updates (see :mod:`flwr_guard.audit.update`):
after several local steps the signs and ratios still hold approximately.
"""

from __future__ import annotations

import torch
from torch import nn


def last_linear_names(model: nn.Module) -> tuple[str, str | None]:
    """Names of the last ``nn.Linear``'s weight and bias (bias ``None`` when absent).

    Raises:
        ValueError: if ``model`` has no ``nn.Linear`` layer.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to infer labels from")
    name, module = last
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if module.bias is not None else None)


def class_signal(
    model: nn.Module, names: list[str], update: list[torch.Tensor]
) -> torch.Tensor:
    """Per-class entry of the last layer's gradient: the bias gradient, or the row sums
    of the weight gradient when the layer has no bias. Shape ``(num_classes,)``."""
    weight_name, bias_name = last_linear_names(model)
    by_name = dict(zip(names, update))
    if bias_name is not None and bias_name in by_name:
        return by_name[bias_name].detach().flatten()
    return by_name[weight_name].detach().sum(dim=1)


def infer_labels(signal: torch.Tensor, num_images: int) -> torch.Tensor:
    """Labels of a batch of ``num_images`` from the per-class ``signal``.

    Args:
        signal: ``(K,)`` per-class entry of the last layer's gradient.
        num_images: batch size ``B >= 1``.

    Returns:
        ``(B,)`` int64 class ids, sorted; for ``B == 1`` the iDLG label ``argmin``.

    Raises:
        ValueError: for ``num_images < 1``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    signal = signal.detach().double().cpu()
    if num_images == 1:
        return signal.argmin().reshape(1)
    weight = torch.clamp(-signal, min=0.0)
    if weight.sum() <= 0:  # no negative entry (e.g. pure noise): fall back to the minimum
        weight = torch.zeros_like(signal)
        weight[signal.argmin()] = 1.0
    share = weight / weight.sum() * num_images
    counts = torch.floor(share).long()
    # Every clearly present class gets at least one image when there is room for it.
    present = torch.argsort(-weight)[: num_images]
    for c in present.tolist():
        if counts.sum() < num_images and counts[c] == 0 and weight[c] > 0:
            counts[c] = 1
    remainder = share - counts.double()
    while counts.sum() < num_images:
        c = int(torch.argmax(remainder))
        counts[c] += 1
        remainder[c] = -1.0
    while counts.sum() > num_images:
        c = int(torch.argmax(counts))
        counts[c] -= 1
    return torch.repeat_interleave(torch.arange(signal.numel()), counts)
