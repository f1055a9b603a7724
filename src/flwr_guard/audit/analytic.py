"""Closed-form recovery of inputs from a fully connected layer's gradient (no optimisation).

For a linear layer ``y = W x + b`` that sees the input ``x`` itself (the model's first
layer, possibly after a flatten or an element-wise affine normalisation), the
gradient of one sample's loss is ``∂L/∂W_i = (∂L/∂y_i) x`` and ``∂L/∂b_i = ∂L/∂y_i``.

- ``fc-row`` — Phong et al., "Privacy-Preserving Deep Learning: Revisited and
  Enhanced" (ATIS 2017) / "…via Additively Homomorphic Encryption" (IEEE TIFS 2018),
  Sec. 3: ``x = (∂L/∂W_i) / (∂L/∂b_i)`` for any row ``i`` with ``∂L/∂b_i ≠ 0``. On a
  batch (or an aggregate) row ``i`` gives the mixture of the samples that activate
  neuron ``i`` — one sample exactly when only that sample does (the principle behind
  the *trap weights* of Boenisch et al., "When the Curious Abandon Honesty", EuroS&P
  2023).
- ``imprint`` — Fowl et al., "Robbing the Fed: Directly Obtaining Private Data in
  Federated Learning with Modified Models" (ICLR 2022), Sec. 3: rows that share one
  direction ``w`` with biases ``−q_1 > −q_2 > …`` cut the data into bins of ``w·x``;
  neuron ``i`` fires for every sample above ``q_i``, so the difference of consecutive
  rows, ``(∂W_i − ∂W_{i+1}) / (∂b_i − ∂b_{i+1})``, is the one sample in bin ``i``
  whenever the bin holds one sample — through any amount of aggregation.

The attack reads the layer's observed gradient-equivalent update, groups rows of
(almost) the same direction (cosine >= :data:`SAME_DIRECTION`), sorts each group by
bias, and returns every single-row and consecutive-difference candidate, mapped back
to the audit's ``[0, 1]`` input form. The audit scores them with the most favourable
pairing, as for every attack. Runs in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from flwr_guard.audit.attack import Attack, AttackTarget

#: Rows whose weight directions have at least this cosine form one imprint group.
SAME_DIRECTION = 0.999
#: A row's bias gradient counts when it exceeds this share of the largest one.
RELATIVE_FLOOR = 1e-6


@dataclass(frozen=True)
class InputLayer:
    """A linear layer that sees the model's input.

    Attributes:
        weight, bias: parameter names (``bias`` may be ``None``: no attack then).
        offset, scale: ``(D,)`` the layer's input is ``offset + scale · u`` for the
            audit's flattened input ``u`` (element-wise affine pre-processing).
    """

    weight: str
    bias: str | None
    offset: torch.Tensor
    scale: torch.Tensor


def input_layers(model: nn.Module, params: dict[str, torch.Tensor],
                 sample_shape: tuple[int, ...]) -> list[InputLayer]:
    """The ``nn.Linear`` layers of ``model`` whose input is an element-wise affine
    function of the model's input (probed at ``u = 0``, ``1`` and ``0.5`` on a batch of
    one ``(1, *sample_shape)``)."""
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            def capture(mod: nn.Module, args: tuple, name: str = names[id(module)]) -> None:
                seen.setdefault(name, []).append(args[0].detach().reshape(-1).double())
            hooks.append(module.register_forward_pre_hook(capture))
    device = next(iter(params.values())).device
    numel = 1
    for d in sample_shape:
        numel *= d
    try:
        with torch.no_grad():
            for value in (0.0, 1.0, 0.5):
                probe = torch.full((1, *sample_shape), value, device=device)
                functional_call(model, params, (probe,))
    except Exception:
        return []
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name, (at0, at1, at_half) in ((n, v[:3]) for n, v in seen.items() if len(v) >= 3):
        if at0.numel() != numel:
            continue
        scale = at1 - at0
        if not torch.allclose(at_half, at0 + 0.5 * scale, atol=1e-5, rtol=1e-4):
            continue
        if (scale.abs() < 1e-12).any():
            continue
        prefix = f"{name}." if name else ""
        out.append(InputLayer(f"{prefix}weight", f"{prefix}bias", at0.float(), scale.float()))
    return out


def _direction_groups(weight: torch.Tensor) -> list[list[int]]:
    """Rows grouped by (almost) equal direction, groups of >= 2 rows only."""
    unit = weight.double() / weight.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = unit @ unit.T
    close = cos >= SAME_DIRECTION
    close.fill_diagonal_(False)
    partnered = close.any(dim=1)
    if not partnered.any():  # honest weights: no two rows line up
        return []
    free = partnered.clone()
    groups = []
    for i in torch.nonzero(partnered).flatten().tolist():
        if not free[i]:
            continue
        members = torch.nonzero((cos[i] >= SAME_DIRECTION) & free).flatten()
        free[members] = False
        if members.numel() >= 2:
            groups.append(members.tolist())
    return groups


def imprint_groups(weight: torch.Tensor) -> list[list[int]]:
    """Public form of the grouping: lists of row indices sharing one direction (the
    structural signature of an imprint/binning layer)."""
    return _direction_groups(weight)


def candidates(weight: torch.Tensor, bias: torch.Tensor, grad_w: torch.Tensor,
               grad_b: torch.Tensor, single_rows: bool = True) -> torch.Tensor:
    """Closed-form candidates ``(K, D)`` in the layer's input units (see module doc).

    Args:
        weight, bias: the layer's received parameters ``(k, D)``, ``(k,)``.
        grad_w, grad_b: the observed gradient(-equivalent) update of that layer.
        single_rows: include Phong's single-row candidates (else only differences).
    """
    grad_w, grad_b = grad_w.double(), grad_b.double()
    floor = RELATIVE_FLOOR * float(grad_b.abs().max().clamp_min(1e-30))
    out = []
    if single_rows:
        rows = torch.nonzero(grad_b.abs() > floor).flatten()
        if rows.numel():
            out.append(grad_w[rows] / grad_b[rows, None])
    for group in _direction_groups(weight):
        idx = torch.as_tensor(group)
        order = idx[torch.argsort(bias[idx].double(), descending=True)]
        dw = grad_w[order[:-1]] - grad_w[order[1:]]
        db = grad_b[order[:-1]] - grad_b[order[1:]]
        keep = db.abs() > floor
        if keep.any():
            out.append(dw[keep] / db[keep, None])
    if not out:
        return grad_w.new_zeros((0, grad_w.shape[1]))
    return torch.cat(out)


class AnalyticAttack(Attack):
    """``fc-row`` (Phong et al.) and ``imprint`` (Fowl et al.) candidates of every input
    layer (see the module docstring); no iterations.

    Args:
        single_rows: include single-row candidates (``fc-row``); ``False`` for the pure
            binning attack.
        name: how the attack is reported.
    """

    def __init__(self, single_rows: bool = True, name: str = "analytic") -> None:
        self.single_rows = single_rows
        self.name = name

    def _run(self, target: AttackTarget, generator: torch.Generator, deadline: float
             ) -> tuple[torch.Tensor, torch.Tensor, float, int, bool]:
        shape = tuple(target.image_shape)
        layers = input_layers(target.model, target.params, shape)
        observed = dict(zip(target.names, target.observed))
        found = []
        for layer in layers:
            if layer.bias not in observed or layer.weight not in observed:
                continue
            raw = candidates(target.params[layer.weight], target.params[layer.bias],
                             observed[layer.weight], observed[layer.bias], self.single_rows)
            unit = (raw.float() - layer.offset.to(raw.device)) / layer.scale.to(raw.device)
            finite = torch.isfinite(unit).all(dim=1)
            found.append(unit[finite])
        images = torch.cat(found) if found else torch.zeros((0, *shape))
        count = images.shape[0]
        # Pad to the number of images behind the update with the attacker's prior guess
        # (the scorer pairs every victim with one candidate).
        if count < target.num_images:
            pad = (target.prior_mean if target.prior_mean is not None
                   else torch.full(shape, 0.5)).to(images.device).reshape(1, -1)
            images = torch.cat([images.reshape(count, -1),
                                pad.expand(target.num_images - count, -1)])
        images = images.reshape(-1, *shape)
        label = target.inferred_labels()[:1].cpu()
        labels = label.expand(images.shape[0]).clone()
        return images, labels, float(-count), 0, False


def recover(model: nn.Module, params: dict[str, torch.Tensor], update: list[torch.Tensor],
            sample_shape: tuple[int, ...], layers: list[InputLayer] | None = None) -> torch.Tensor:
    """Every closed-form candidate of ``update`` (``(K, *sample_shape)``, audit units).

    A convenience for the trap-model check and benchmarks; see :class:`AnalyticAttack`.
    ``layers``: the model's :func:`input_layers` when already known.
    """
    observed = dict(zip(params, update))
    found = []
    if layers is None:
        layers = input_layers(model, params, sample_shape)
    for layer in layers:
        if layer.bias is None:
            continue
        raw = candidates(params[layer.weight], params[layer.bias], observed[layer.weight],
                         observed[layer.bias])
        unit = (raw.float() - layer.offset.to(raw.device)) / layer.scale.to(raw.device)
        found.append(unit[torch.isfinite(unit).all(dim=1)])
    if not found:
        return torch.zeros((0, *sample_shape))
    return torch.cat(found).reshape(-1, *sample_shape)
