"""Input-space gradients, Hessian-vector products and a curvature measure (no Flower imports).

For a classifier ``model`` and a batch ``(x, y)`` the loss is the *summed* per-example
cross-entropy, so that the gradient and the Hessian are per example (examples do not
interact in a model without batch statistics; GroupNorm, LayerNorm are fine, BatchNorm
in training mode is not).

- :func:`input_hvp`: ``H v`` with ``H = d^2 loss / dx^2``, exactly by double backward
  (Pearlmutter 1994, "Fast exact multiplication by the Hessian"; ``torch.autograd.grad``
  with ``create_graph=True``) or by the central finite difference
  ``(grad(x + h v) - grad(x - h v)) / (2 h)`` (the form CURE uses, one-sided there).
- :func:`curvature`: the largest eigenvalue of each example's input Hessian by power
  iteration on :func:`input_hvp` (the quantity CURE and SCORPIO aim to lower;
  Moosavi-Dezfooli et al., CVPR 2019, Sec. 3). Shapes: ``x`` ``(B, C, H, W)`` float32,
  ``v`` like ``x``; results ``(B, ...)`` like ``x`` or ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def input_grad(model: Model, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False
               ) -> torch.Tensor:
    """``d/dx sum_i CE(model(x_i), y_i)``: ``(B, ...) -> (B, ...)`` (graph kept if asked)."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [x], create_graph=create_graph)
    return grad


def input_hvp(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    method: Literal["double-backward", "finite-difference"] = "double-backward",
    h: float = 1e-3,
    create_graph: bool = False,
) -> torch.Tensor:
    """Per-example input Hessian-vector product ``H(x_i) v_i``, shape of ``x``.

    Args:
        method: ``"double-backward"`` (exact) or ``"finite-difference"`` (central, step
            ``h``; exact for quadratic losses, ``O(h^2)`` error otherwise).
        create_graph: keep the graph (to train through the product).

    Raises:
        ValueError: if ``v`` and ``x`` differ in shape, for an unknown method or ``h <= 0``.
    """
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if method == "double-backward":
        xg = x.detach().requires_grad_(True)
        grad = input_grad(model, xg, y, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), [xg], create_graph=create_graph)
        return hv
    if method == "finite-difference":
        if not h > 0:
            raise ValueError(f"h must be > 0, got {h}")
        plus = input_grad(model, x.detach() + h * v, y, create_graph=create_graph)
        minus = input_grad(model, x.detach() - h * v, y, create_graph=create_graph)
        return (plus - minus) / (2 * h)
    raise ValueError(f"method must be 'double-backward' or 'finite-difference', got {method!r}")


def curvature(model: Model, x: torch.Tensor, y: torch.Tensor, iterations: int = 20,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Largest-magnitude eigenvalue of each example's input Hessian, ``(B,)`` float32.

    Power iteration with exact HVPs (``iterations`` products) from a random start; the
    Rayleigh quotient ``v.Hv`` of the last unit vector is returned (its sign is kept).
    """
    b = x.shape[0]
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(b, *([1] * (x.ndim - 1)))
    value = torch.zeros(b, device=x.device)
    for _ in range(iterations):
        hv = input_hvp(model, x, y, v).detach()
        value = (hv * v).flatten(1).sum(dim=1)
        norm = hv.flatten(1).norm(dim=1).clamp_min(1e-12)
        v = hv / norm.reshape(b, *([1] * (x.ndim - 1)))
    return value
