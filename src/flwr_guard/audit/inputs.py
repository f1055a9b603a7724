"""What the audit accepts as a client's data, and in which form it attacks it.

``data_fn(context)`` may return

- a pair ``(inputs, labels)`` of NumPy arrays or tensors;
- a dict batch ``{"x": inputs, "y": labels}`` (keys named with ``input_key`` /
  ``target_key``, or one of the usual pairs :data:`KEY_PAIRS`);
- an iterable of such batches (a ``DataLoader``): batches are concatenated up to
  ``max_samples`` samples.

Modalities (``modality="auto"`` picks by dtype and rank):

| modality | inputs | what is attacked and scored |
| --- | --- | --- |
| ``image`` | float ``(M, C, H, W)`` (or ``(M, H, W)``) in ``[0, 1]`` | pixels |
| ``vector`` | float ``(M, D)``, ``(M, *S)``, any range (tabular, embeddings) | features scaled to ``[0, 1]`` |
| ``tokens`` | integer ``(M, L)`` token ids | the token set (embedding-gradient attack) |

Auto: integer inputs are ``tokens``; float rank 4 (and rank 3, as before) ``image``;
every other float rank ``vector``. Pass ``modality="vector"`` for ``(M, L, E)``
embedding sequences.

A vector feature ``x_j`` is attacked as ``u_j = (x_j − lo_j) / (hi_j − lo_j)`` with
``lo``/``hi`` the client's per-feature minimum and maximum (a constant feature keeps
range 1): the box ``[0, 1]`` of the image attacks is then the data's own range, and
the model sees ``lo + (hi − lo) · u`` through a forward pre-hook (no parameter name
changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

MODALITIES = ("auto", "image", "vector", "tokens")
#: Dict-batch keys tried, in order, when none are named.
KEY_PAIRS = (("x", "y"), ("img", "label"), ("image", "label"), ("input", "target"),
             ("inputs", "targets"), ("features", "label"), ("input_ids", "label"))


class UnsupportedAuditInput(ValueError):
    """The audit cannot run on this model or data; the message names type and shape."""


def describe(value: Any) -> str:
    """``"Tensor(float32, (10, 13))"``-style description of a value for error messages."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None:
        return f"{type(value).__name__}({dtype}, {tuple(int(s) for s in shape)})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))[:8]}"
    return type(value).__name__


def _from_dict(batch: Mapping[str, Any], input_key: str | None, target_key: str | None
               ) -> tuple[Any, Any]:
    pairs = [(input_key, target_key)] if input_key and target_key else list(KEY_PAIRS)
    for x_key, y_key in pairs:
        if x_key in batch and y_key in batch:
            return batch[x_key], batch[y_key]
    raise UnsupportedAuditInput(
        f"a dict batch with keys {sorted(map(str, batch))} has none of the key pairs "
        f"{pairs}: name them with LeakageAudit(input_key=..., target_key=...)")


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.as_tensor(np.asarray(value))


def as_pair(data: Any, input_key: str | None = None, target_key: str | None = None,
            max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` tensors from what ``data_fn`` returned (see the module doc).

    Raises:
        UnsupportedAuditInput: anything else, named with its type (and shape).
    """
    if isinstance(data, Mapping):
        x, y = _from_dict(data, input_key, target_key)
        return _tensor(x), _tensor(y).reshape(-1)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _tensor(data[0]), _tensor(data[1]).reshape(-1)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor, np.ndarray)):
        xs, ys, count = [], [], 0
        for batch in data:
            x, y = as_pair(batch, input_key, target_key)
            xs.append(x)
            ys.append(y)
            count += x.shape[0]
            if max_samples is not None and count >= max_samples:
                break
        if not xs:
            raise UnsupportedAuditInput(f"the data ({describe(data)}) yielded no batch")
        x, y = torch.cat(xs), torch.cat(ys)
        return (x[:max_samples], y[:max_samples]) if max_samples else (x, y)
    raise UnsupportedAuditInput(
        f"data_fn must return (inputs, labels), a dict batch or an iterable of batches; "
        f"got {describe(data)}")


def detect_modality(inputs: torch.Tensor, modality: str = "auto") -> str:
    """The modality of ``inputs`` (``modality`` when not ``"auto"``).

    Raises:
        UnsupportedAuditInput: an unknown modality, or inputs of rank < 2, or integer
            inputs declared continuous, or float inputs declared ``tokens``.
    """
    if modality not in MODALITIES:
        raise UnsupportedAuditInput(f"modality must be one of {MODALITIES}, got {modality!r}")
    integer = not (inputs.is_floating_point() or inputs.is_complex())
    if inputs.dim() < 2:
        raise UnsupportedAuditInput(
            f"inputs must be (samples, ...), got {describe(inputs)}")
    if modality == "auto":
        if integer:
            return "tokens"
        return "image" if inputs.dim() in (3, 4) else "vector"
    if modality == "tokens" and not integer:
        raise UnsupportedAuditInput(f"token inputs must be integer ids, got {describe(inputs)}")
    if modality != "tokens" and integer and inputs.dtype == torch.bool:
        raise UnsupportedAuditInput(f"boolean inputs are not supported: {describe(inputs)}")
    return modality


@dataclass
class AuditData:
    """A client's data in the form the audit attacks.

    Attributes:
        inputs: ``image``: float32 ``(M, C, H, W)`` in ``[0, 1]``; ``vector``: float32
            ``(M, *S)`` in ``[0, 1]`` (per-feature min-max, see the module doc);
            ``tokens``: int64 ``(M, L)``.
        labels: int64 ``(M,)``.
        modality: ``"image"``, ``"vector"`` or ``"tokens"``.
        low, span: ``(*S,)`` float32 per-feature minimum and range of a ``vector``
            (original units ``= low + span · inputs``), else ``None``.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    modality: str
    low: torch.Tensor | None = None
    span: torch.Tensor | None = None

    def original_units(self, unit: torch.Tensor) -> torch.Tensor:
        """Map ``[0, 1]`` vectors back to the data's units (identity for images)."""
        if self.low is None or self.span is None:
            return unit
        return self.low.to(unit) + self.span.to(unit) * unit

    def unit_range(self, original: torch.Tensor) -> torch.Tensor:
        """Map vectors in the data's units to the attacked ``[0, 1]`` form."""
        if self.low is None or self.span is None:
            return original
        return (original - self.low.to(original)) / self.span.to(original)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``model`` with a forward pre-hook mapping ``[0, 1]`` vectors to its units."""
        if self.low is None or self.span is None:
            return model
        low, span = self.low, self.span
        model.register_forward_pre_hook(
            lambda _m, args: (low.to(args[0]) + span.to(args[0]) * args[0], *args[1:]))
        return model


def prepare(inputs: Any, labels: Any, modality: str = "auto") -> AuditData:
    """Check and convert a client's data (see :class:`AuditData`).

    Raises:
        UnsupportedAuditInput: mismatched lengths, non-finite values, images outside
            ``[0, 1]``, negative token ids; each names the offending type and shape.
    """
    x, y = _tensor(inputs), _tensor(labels)
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise UnsupportedAuditInput(
                f"labels must be class ids (classification), got {describe(y)} with "
                "fractional values")
    y = y.long().reshape(-1)
    kind = detect_modality(x, modality)
    if y.shape[0] != x.shape[0]:
        raise UnsupportedAuditInput(
            f"{x.shape[0]} inputs but {y.shape[0]} labels: inputs {describe(x)}, "
            f"labels {describe(y)}")
    if kind == "tokens":
        x = x.long()
        if x.dim() != 2 or x.min() < 0:
            raise UnsupportedAuditInput(
                f"token inputs must be non-negative ids (M, L), got {describe(x)}")
        return AuditData(x, y, kind)
    x = x.float()
    if not torch.isfinite(x).all():
        raise UnsupportedAuditInput(f"inputs hold NaN or infinite values: {describe(x)}")
    if kind == "image":
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise UnsupportedAuditInput(f"images must be (M, C, H, W), got {describe(x)}")
        if x.min() < 0.0 or x.max() > 1.0:
            raise UnsupportedAuditInput(
                "pixel values must lie in [0, 1] (pass LeakageAudit(normalization=...) for "
                f"normalised images, or modality='vector'); got {describe(x)} in "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
        return AuditData(x, y, kind)
    low = x.min(dim=0).values
    span = x.max(dim=0).values - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    return AuditData((x - low) / span, y, kind, low, span)
