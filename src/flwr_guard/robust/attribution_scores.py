"""Faithfulness and robustness scores of attribution maps (no Flower imports).

Inputs everywhere: a classifier ``model``, images ``x`` float32 ``(B, C, H, W)`` in
``[0, 1]``, targets int64 ``(B,)`` and maps of ``x``'s shape from
:mod:`flwr_guard.robust.attributions`. Every score returns one value per example
``(B,)`` float; :func:`score_attributions` averages them.

- Deletion / insertion AUC (Petsiuk et al., "RISE", BMVC 2018, Sec. 4.1): pixels in
  decreasing attribution order are removed from the image (set to 0) / inserted into an
  all-zero image, in ``steps`` equal shares; the area under the target's softmax
  probability against the share changed (trapezoid rule). Lower deletion and higher
  insertion = more faithful. (RISE inserts into a blurred copy; a blur of an 8x8 digit is
  almost the mean, so zeros are used here.)
- Infidelity (Yeh et al., NeurIPS 2019, Def. 2.1): Captum ``infidelity`` with Gaussian
  perturbations ``I ~ N(0, sigma^2)`` and ``normalize=True`` (the optimal scale of the map
  first, so maps of different units compare). Lower = better.
- Max-sensitivity (Yeh et al., Def. 3.1): Captum ``sensitivity_max`` — the largest change
  of the map under uniform input noise of L-infinity radius ``r``, relative to the map's
  norm. Lower = more robust.
- Top-k intersection (Ghorbani et al., "Interpretation of Neural Networks is Fragile",
  AAAI 2019, Sec. 3): share of the ``k`` most attributed pixels that stay in the top ``k``
  under Gaussian input noise. Higher = more robust.
- Model randomisation (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018,
  Sec. 3): Spearman rank correlation of ``|map|`` between the model and a copy whose
  every layer is re-initialised. Near 1 = the map ignores the model (fails the check).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from captum.metrics import infidelity, sensitivity_max
from scipy.stats import spearmanr
from torch import nn

from flwr_guard.device import cpu_settings
from flwr_guard.robust.attributions import METHODS, Attribution

SCORES = ("deletion_auc", "insertion_auc", "infidelity", "max_sensitivity", "topk_intersection",
          "randomisation_spearman")


def _order(attr: torch.Tensor) -> torch.Tensor:
    """Pixel indices (over H*W, channels summed) by decreasing attribution: ``(B, H*W)``."""
    return attr.sum(dim=1).flatten(1).argsort(dim=1, descending=True)


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, attr: torch.Tensor,
                       steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deletion AUC (B,), insertion AUC (B,))``, each in ``[0, 1]``.

    Raises:
        ValueError: if ``attr`` does not have ``x``'s shape or ``steps < 1``.
    """
    if attr.shape != x.shape or steps < 1:
        raise ValueError(f"attr must have x's shape {tuple(x.shape)} and steps >= 1")
    b, c, h, w = x.shape
    order = _order(attr)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w).expand(b, -1).contiguous())
    curves: dict[str, list[torch.Tensor]] = {"deletion": [], "insertion": []}
    for k in range(steps + 1):
        n = round(k * h * w / steps)
        top = (ranks < n).reshape(b, 1, h, w).expand(-1, c, -1, -1)
        for kind, image in (("deletion", torch.where(top, 0.0, x)),
                            ("insertion", torch.where(top, x, 0.0))):
            prob = F.softmax(model(image), dim=1).gather(1, target[:, None]).squeeze(1)
            curves[kind].append(prob)
    grid = np.linspace(0.0, 1.0, steps + 1)
    out = []
    for kind in ("deletion", "insertion"):
        values = torch.stack(curves[kind], dim=1).cpu().numpy()
        out.append(torch.tensor(np.trapezoid(values, grid, axis=1), dtype=torch.float32))
    return out[0], out[1]


def infidelity_score(model: nn.Module, x: torch.Tensor, target: torch.Tensor, attr: torch.Tensor,
                     sigma: float = 0.1, samples: int = 16) -> torch.Tensor:
    """Captum ``infidelity`` (normalised) with ``N(0, sigma^2)`` perturbations: ``(B,)``."""
    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn_like(inputs) * sigma
        return noise, inputs - noise

    return infidelity(model, perturb, x, attr, target=target, n_perturb_samples=samples,
                      normalize=True).detach()


def max_sensitivity(method: Attribution, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                    radius: float = 0.02, samples: int = 8) -> torch.Tensor:
    """Captum ``sensitivity_max`` of ``method`` at L-infinity radius ``radius``: ``(B,)``."""
    def explain(inputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor
                ) -> tuple[torch.Tensor]:
        if isinstance(inputs, tuple):  # Captum passes the perturbed inputs as a tuple
            inputs = inputs[0]
        with torch.enable_grad():  # Captum calls it under no_grad
            return (method(model, inputs, target),)  # the tuple form Captum gave

    return sensitivity_max(explain, x, perturb_radius=radius, n_perturb_samples=samples,
                           target=target).detach()


def topk_intersection(method: Attribution, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                      attr: torch.Tensor, k: int = 10, noise_std: float = 0.02,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Share of the top-``k`` pixels kept under ``N(0, noise_std^2)`` input noise: ``(B,)``."""
    noisy = (x + torch.randn(x.shape, generator=generator).to(x.device) * noise_std).clamp(0, 1)
    a, b = _order(attr)[:, :k], _order(method(model, noisy, target))[:, :k]
    same = (a[:, :, None] == b[:, None, :]).any(dim=2).float()
    return same.mean(dim=1)


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every layer that has ``reset_parameters`` re-initialised."""
    torch.manual_seed(seed)
    clone = copy.deepcopy(model)
    for m in clone.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not clone:
            reset()
    return clone.eval()


def randomisation_spearman(method: Attribution, model: nn.Module, x: torch.Tensor,
                           target: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of ``|attr|`` with the randomised model's ``|map|``: ``(B,)``
    (1 when both maps are flat, 0 when only one is)."""
    other = method(randomised_copy(model), x, target)
    values = []
    for a, o in zip(attr.abs().flatten(1).cpu().numpy(), other.abs().flatten(1).cpu().numpy()):
        if np.ptp(a) == 0 or np.ptp(o) == 0:  # no ranking: equal if both are flat
            values.append(1.0 if np.ptp(a) == np.ptp(o) == 0 else 0.0)
            continue
        values.append(float(spearmanr(a, o).statistic))
    return torch.tensor(values)


def score_attributions(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                       methods: Mapping[str, Attribution] = METHODS, seed: int = 0,
                       cpu_threads: int | None = 1) -> dict[str, dict[str, float]]:
    """Every score of :data:`SCORES` for every method, averaged over the examples:
    ``{method: {score: value}}`` (``cpu_threads``: :func:`flwr_guard.device.cpu_settings`)."""
    with cpu_settings(x.device, cpu_threads, disable_onednn=cpu_threads is not None):
        return _score_all(model, x, target, methods, seed)


def _score_all(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               methods: Mapping[str, Attribution], seed: int) -> dict[str, dict[str, float]]:
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for name, method in methods.items():
        torch.manual_seed(seed)
        attr = method(model, x, target)
        deletion, insertion = deletion_insertion(model, x, target, attr)
        scores = {
            "deletion_auc": deletion,
            "insertion_auc": insertion,
            "infidelity": infidelity_score(model, x, target, attr),
            "max_sensitivity": max_sensitivity(method, model, x, target),
            "topk_intersection": topk_intersection(method, model, x, target, attr,
                                                   generator=torch.Generator().manual_seed(seed)),
            "randomisation_spearman": randomisation_spearman(method, model, x, target, attr),
        }
        out[name] = {k: float(v.float().mean()) for k, v in scores.items()}
    return out
