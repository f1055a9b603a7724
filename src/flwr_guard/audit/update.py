"""The update a client sends, as a differentiable function of its data.

A client that receives weights ``θ₀`` and runs ``local_steps`` full-batch SGD steps with
learning rate ``η`` on a batch ``(x, y)`` sends the update ``Δ = θ_T − θ₀``. Every
attack and the audit's probe work on the *gradient-equivalent* form of it,

    u = (θ₀ − θ_T) / (η · local_steps),

which is exactly the batch gradient ``∇θ L(x, y)`` for one step (FedSGD) and the mean
of the gradients along the local trajectory for several steps (FedAvg). Simulating
``u`` with ``create_graph=True`` lets an attacker differentiate through the local
steps, which is the FedAvg variant of Inverting Gradients (Geiping et al., "Inverting
Gradients — How easy is it to break privacy in federated learning?", NeurIPS 2020,
Sec. 5 "Federated averaging").

The loss is the mean cross-entropy over the batch against *soft* labels (probability
rows), so DLG can optimise the label together with the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTraining:
    """How a client turns a batch into its update.

    Attributes:
        local_steps: full-batch SGD steps on the batch (1 = FedSGD, the gradient).
        learning_rate: SGD step size ``η`` (> 0). With one step it only scales the
            update; the gradient-equivalent form divides it out.

    Raises:
        ValueError: for ``local_steps < 1`` or ``learning_rate <= 0``.
    """

    local_steps: int = 1
    learning_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def trainable_params(model: nn.Module) -> Params:
    """Detached copies of ``model``'s trainable parameters, in ``named_parameters`` order."""
    return {
        name: param.detach().clone() for name, param in model.named_parameters()
        if param.requires_grad
    }


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(B, K)`` logits against ``(B,)`` class ids or ``(B, K)``
    probability rows (scalar float tensor)."""
    if targets.dim() == 1:
        return nn.functional.cross_entropy(logits, targets)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def gradient_equivalent_update(
    model: nn.Module,
    params: Params,
    images: torch.Tensor,
    targets: torch.Tensor,
    training: LocalTraining,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``u = (θ₀ − θ_T)/(η·T)`` after ``T`` SGD steps on ``(images, targets)``.

    Args:
        model: the architecture; its own parameters are not used or changed
            (``torch.func.functional_call`` runs it on ``params``).
        params: ``θ₀`` by name (see :func:`trainable_params`).
        images: float ``(B, C, H, W)``.
        targets: ``(B,)`` int64 class ids or ``(B, K)`` probabilities.
        training: local steps and learning rate.
        create_graph: keep the graph so that ``u`` can be differentiated with respect
            to ``images`` / ``targets`` (what the attacks need).

    Returns:
        One tensor per parameter, in ``params`` order, same shapes.
    """
    names = list(params)
    theta = {name: p if p.requires_grad else p.detach().requires_grad_(True)
             for name, p in params.items()}
    start = {name: p for name, p in theta.items()}
    for _ in range(training.local_steps):
        loss = soft_cross_entropy(functional_call(model, theta, (images,)), targets)
        grads = torch.autograd.grad(
            loss, [theta[n] for n in names], create_graph=create_graph
        )
        theta = {n: theta[n] - training.learning_rate * g for n, g in zip(names, grads)}
    scale = 1.0 / (training.learning_rate * training.local_steps)
    update = [(start[n] - theta[n]) * scale for n in names]
    if not create_graph:
        update = [u.detach() for u in update]
    return update


def update_norm(update: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm over every tensor of ``update`` (scalar tensor)."""
    return torch.sqrt(torch.stack([(u.double() ** 2).sum() for u in update]).sum()).to(update[0].dtype)
