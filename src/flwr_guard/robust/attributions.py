"""Attribution maps: Integrated Gradients and occlusion (Captum), Grad-CAM++ and PGCA
(no Flower imports).

Every method maps a classifier, images ``x`` float32 ``(B, C, H, W)`` and target classes
``target`` int64 ``(B,)`` to a map of the input's shape ``(B, C, H, W)`` float32 (Grad-CAM++
and PGCA produce one value per location, repeated over channels); larger = more
evidence for ``target``.

- ``ig``: Integrated Gradients (Sundararajan et al., ICML 2017, Eq. 1; Captum
  ``IntegratedGradients``, black baseline, Gauss-Legendre steps); the completeness gap
  ``sum(attr) - (f(x) - f(0))`` is returned by :func:`integrated_gradients`.
- ``occlusion``: Zeiler and Fergus (ECCV 2014) occlusion, Captum ``Occlusion`` with a
  sliding 2x2 window, stride 1, zero baseline.
- ``gradcam++``: Chattopadhyay et al., "Grad-CAM++", WACV 2018, Eq. 19 with the
  exponential-score closed form of the higher derivatives (their Sec. 3.1):
  ``alpha_kij = g^2 / (2 g^2 + sum_ab A_kab g^3)``, ``w_k = sum_ij alpha_kij ReLU(g_kij)``,
  ``L = ReLU(sum_k w_k A_k)``, bilinearly upsampled to the input; ``A`` is the output of
  a convolutional layer (by default the rectified output of the last ``Conv2d``,
  :func:`default_layer`) and ``g = dS_c / dA`` with
  ``S_c`` the target logit. Not in Captum; checked against its closed form in
  tests/test_robust_attributions.py.
- ``pgca``: perturbation-gradient consensus attribution after Islam et al., arXiv
  2412.03884 (2024). The perturbation map over a ``grid x grid`` partition of the image
  (8x8 by default) is the mean drop in the target's softmax probability when a cell is
  replaced by zeros and when it is replaced by Gaussian noise (Captum
  ``FeatureAblation`` with the grid as feature mask). The gradient map is Grad-CAM++
  averaged over each cell. The fusion ("consensus amplification") is the project's own
  rule, since the paper's exact formula was not available: the geometric mean
  ``sqrt(P_n * G_n)`` of the two maps after each is min-max normalised to ``[0, 1]`` —
  a cell ranks high only when both agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import FeatureAblation, IntegratedGradients, Occlusion
from torch import nn

Attribution = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def default_layer(model: nn.Module) -> nn.Module:
    """Grad-CAM++'s default layer: the rectified feature maps of the last convolution —
    the first ``nn.ReLU`` after the last ``nn.Conv2d`` in module order, else that conv.

    (On a pre-activation conv output, maps whose gradient reaches a max-pool at one
    location localise poorly: a planted cue was found in 0 of 32 images, against 32 of
    32 on the ReLU's output; tests/test_robust_attributions.py.)

    Raises:
        ValueError: if the model has no ``Conv2d``.
    """
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("Grad-CAM++ needs a Conv2d layer; pass layer= explicitly")
    for m in modules[convs[-1] + 1:]:
        if isinstance(m, nn.ReLU):
            return m
    return modules[convs[-1]]


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                         steps: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients from a black baseline: ``(map (B, C, H, W), completeness gap (B,))``."""
    ig = IntegratedGradients(model)
    attr, delta = ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=steps,
                               return_convergence_delta=True)
    return attr.detach(), delta.detach()


def ig_map(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return integrated_gradients(model, x, target)[0]


def occlusion_map(model: nn.Module, x: torch.Tensor, target: torch.Tensor, window: int = 2) -> torch.Tensor:
    """Captum occlusion: output drop when a ``window x window`` patch (stride 1) is zeroed."""
    c = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(c, window, window),
                                      strides=(c, 1, 1), baselines=0.0, target=target).detach()


def gradcam_pp(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               layer: nn.Module | None = None, upsample: bool = True) -> torch.Tensor:
    """Grad-CAM++ map: ``(B, C, H, W)`` (upsampled) or ``(B, 1, h, w)`` at the layer.

    Raises:
        ValueError: if ``layer`` is ``None`` and the model has no ``Conv2d``.
    """
    layer = layer if layer is not None else default_layer(model)
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            score = model(xg).gather(1, target[:, None]).sum()
            a = store["a"]
            (g,) = torch.autograd.grad(score, [a])
    finally:
        handle.remove()
    a, g = a.detach(), g.detach()
    g2, g3 = g * g, g * g * g
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    weights = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))
    if not upsample:
        return cam
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam.expand(-1, x.shape[1], -1, -1).contiguous()


def grid_mask(shape: tuple[int, ...], grid: int = 8) -> torch.Tensor:
    """Feature mask ``(1, C, H, W)`` int64 assigning each pixel its cell id in a
    ``grid x grid`` partition (row-major; all channels of a cell share its id).

    Raises:
        ValueError: if ``H`` or ``W`` is smaller than ``grid``.
    """
    c, h, w = shape[-3:]
    if h < grid or w < grid:
        raise ValueError(f"a {grid}x{grid} grid needs images of at least that size, got {h}x{w}")
    rows = torch.arange(h) * grid // h
    cols = torch.arange(w) * grid // w
    cells = rows[:, None] * grid + cols[None, :]
    return cells.expand(1, c, h, w).clone()


def _per_cell(values: torch.Tensor, mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Mean of ``values`` (B, C, H, W) over each cell: ``(B, cells)``."""
    flat, ids = values.flatten(1), mask.flatten(1).expand(values.shape[0], -1)
    total = torch.zeros(values.shape[0], cells, dtype=values.dtype).scatter_add_(1, ids, flat)
    count = torch.zeros(values.shape[0], cells, dtype=values.dtype).scatter_add_(1, ids, torch.ones_like(flat))
    return total / count.clamp_min(1)


def _minmax(v: torch.Tensor) -> torch.Tensor:
    lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
    return (v - lo) / (hi - lo).clamp_min(1e-12)


def pgca_cells(model: nn.Module, x: torch.Tensor, target: torch.Tensor, grid: int = 8,
               noise_std: float = 0.5, noise_samples: int = 4,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """PGCA per cell: ``{"perturbation", "gradient", "consensus"}``, each ``(B, grid^2)``
    in ``[0, 1]`` (row-major cells)."""
    mask = grid_mask(tuple(x.shape), grid).to(x.device)
    def prob(inp: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(inp), dim=1)

    ablation = FeatureAblation(prob)
    drops = [ablation.attribute(x, baselines=0.0, target=target, feature_mask=mask)]
    for _ in range(noise_samples):
        noise = torch.randn(x.shape, generator=generator).to(x.device) * noise_std
        drops.append(ablation.attribute(x, baselines=(x + noise).clamp(0, 1), target=target,
                                        feature_mask=mask))
    zero, noisy = drops[0], torch.stack(drops[1:]).mean(0)
    cells = grid * grid
    perturbation = _minmax(_per_cell(0.5 * (zero + noisy).detach(), mask, cells))
    gradient = _minmax(_per_cell(gradcam_pp(model, x, target), mask, cells))
    return {"perturbation": perturbation, "gradient": gradient,
            "consensus": (perturbation * gradient).sqrt()}


def pgca_map(model: nn.Module, x: torch.Tensor, target: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """PGCA consensus map at pixel resolution, ``(B, C, H, W)`` (each cell's value)."""
    cells = pgca_cells(model, x, target, grid, generator=torch.Generator().manual_seed(0))["consensus"]
    mask = grid_mask(tuple(x.shape), grid).to(x.device).expand(x.shape[0], -1, -1, -1)
    return torch.gather(cells, 1, mask.flatten(1)).reshape(x.shape)


METHODS: dict[str, Attribution] = {
    "ig": ig_map,
    "occlusion": occlusion_map,
    "gradcam++": lambda m, x, t: gradcam_pp(m, x, t),
    "pgca": pgca_map,
}
