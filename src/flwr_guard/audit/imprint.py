"""What a malicious server plants: an imprint (binning) layer (positive controls only).

Fowl et al., "Robbing the Fed: Directly Obtaining Private Data in Federated Learning
with Modified Models", ICLR 2022, Sec. 3: every row of a linear layer that sees the
input gets the same direction ``w`` (here the mean of the features, the paper's
"brightness"), and the biases ``−q_1 > −q_2 > … > −q_k`` are the quantiles of ``w·x``
under a Gaussian fitted to public data, so each bin holds about ``N / k`` of ``N``
records. The next linear layer gets identical columns for those rows, so that every
bin's neuron receives the same ``∂L/∂y`` from a sample and consecutive differences
isolate it (:mod:`flwr_guard.audit.analytic`). This module exists to test the
client's trap-model check; flwr-guard never sends such a model.
"""

from __future__ import annotations

from statistics import NormalDist

import torch


def plant_imprint(state: dict[str, torch.Tensor], layer: str, next_layer: str | None,
                  public: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose ``layer`` is an imprint layer calibrated on ``public``.

    Args:
        state: the honest model's state dict (not modified).
        layer: prefix of the linear layer that sees the input (``"0"`` for
            ``Sequential(Linear, ...)``): ``{layer}.weight`` ``(k, D)``, ``{layer}.bias``.
        next_layer: prefix of the following linear layer (columns made identical), or
            ``None``.
        public: ``(M, D)`` records of the population in the layer's input units (the
            server's public data) to place the bins.

    Returns:
        The malicious state dict.
    """
    out = {k: v.clone() for k, v in state.items()}
    weight = out[f"{layer}.weight"]
    k, d = weight.shape
    direction = torch.full((d,), 1.0 / d)
    proj = public.reshape(public.shape[0], -1).double() @ direction.double()
    normal = NormalDist(float(proj.mean()), float(proj.std()) + 1e-12)
    quantiles = torch.tensor([normal.inv_cdf((i + 1) / (k + 1)) for i in range(k)])
    out[f"{layer}.weight"] = direction.expand(k, d).clone().to(weight.dtype)
    out[f"{layer}.bias"] = (-quantiles).to(weight.dtype)
    if next_layer is not None:
        nxt = out[f"{next_layer}.weight"]
        out[f"{next_layer}.weight"] = nxt[:, :1].expand_as(nxt).clone()
    return out


def plant_trap_weights(state: dict[str, torch.Tensor], layer: str, public: torch.Tensor,
                       active_share: float) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose ``layer`` fires rarely: trap weights.

    Boenisch et al., "When the Curious Abandon Honesty: Federated Learning Is Not
    Private", EuroS&P 2023, Sec. 4: rows stay random (no shared direction, so no
    structural signature), but each row's bias is moved so that only about
    ``active_share`` of the population activates it; a neuron that one record of the
    aggregate activates reveals that record through Phong's row ratio. Here the bias is
    the ``1 − active_share`` quantile of ``w_i·x`` over ``public`` (the server's public
    data, in the layer's input units).

    Raises:
        ValueError: for ``active_share`` outside ``(0, 1)``.
    """
    if not 0.0 < active_share < 1.0:
        raise ValueError(f"active_share must be in (0, 1), got {active_share}")
    out = {k: v.clone() for k, v in state.items()}
    weight = out[f"{layer}.weight"].double()
    proj = public.reshape(public.shape[0], -1).double() @ weight.T  # (M, k)
    threshold = torch.quantile(proj, 1.0 - active_share, dim=0)
    out[f"{layer}.bias"] = (-threshold).to(out[f"{layer}.bias"].dtype)
    return out
