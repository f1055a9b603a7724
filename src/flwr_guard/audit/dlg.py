"""DLG and iDLG: L-BFGS on dummy data to match the observed update in L2.

- DLG (Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019, Alg. 1): optimise a
  dummy image and a dummy soft label (softmax of free logits) with L-BFGS so that
  their gradient matches the observed one in squared L2 distance.
- iDLG (Zhao et al., "iDLG: Improved Deep Leakage from Gradients", 2020, Sec. 3): read
  the label off the last layer's gradient first (:mod:`flwr_guard.audit.labels`), then
  optimise the image only.

Unlike the papers' loop (plain L-BFGS steps of length 1, which diverges on 28x28
inputs), every L-BFGS step uses a strong-Wolfe line search
(``torch.optim.LBFGS(line_search_fn="strong_wolfe")``). Images are not boxed during the
optimisation (as in the papers) and are clamped to ``[0, 1]`` at the end.

Both model an attacker who matches magnitudes: against a clipped update they match a
rescaled target, which is why the audit runs them next to the scale-free
Inverting Gradients attack and reports the worst case.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from flwr_guard.audit.attack import Attack, AttackTarget, random_images
from flwr_guard.audit.matching import cosine_distance, l2_distance
from flwr_guard.audit.update import gradient_equivalent_update

_DISTANCES = {"l2": l2_distance, "cosine": cosine_distance}



@dataclass
class _Best:
    """The lowest-loss point the optimiser evaluated so far."""

    loss: float
    images: torch.Tensor
    labels: torch.Tensor

class DLG(Attack):
    """Deep Leakage from Gradients (L-BFGS, L2, soft labels).

    Args:
        max_iterations: L-BFGS iterations in all (the papers use 300 steps of up to 20).
        history_size: L-BFGS memory.
        infer_labels: fix the labels from the gradient (iDLG) instead of optimising them.
        distance: ``"l2"`` (the papers) or ``"cosine"`` (the scale-free distance of
            Inverting Gradients: models an attacker who knows the update was clipped).
        name: how the attack is reported (default ``"dlg"`` / ``"idlg"``, with a
            ``"-cos"`` suffix for the cosine distance).

    Raises:
        ValueError: for ``max_iterations < 1`` or an unknown ``distance``.
    """

    def __init__(
        self,
        max_iterations: int = 300,
        history_size: int = 100,
        infer_labels: bool = False,
        distance: str = "l2",
        name: str | None = None,
    ) -> None:
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {sorted(_DISTANCES)}, got {distance!r}")
        self.max_iterations = max_iterations
        self.history_size = history_size
        self.infer_labels = infer_labels
        self.distance = distance
        default = "idlg" if infer_labels else "dlg"
        self.name = name or (default if distance == "l2" else f"{default}-cos")

    def _run(
        self, target: AttackTarget, generator: torch.Generator, deadline: float
    ) -> tuple[torch.Tensor, torch.Tensor, float, int, bool]:
        images = random_images(target, generator).requires_grad_(True)
        variables = [images]
        if self.infer_labels:
            labels = target.inferred_labels()
            fixed_targets = torch.nn.functional.one_hot(labels, target.num_classes).float()
            logits = None
        else:
            logits = torch.randn(
                (target.num_images, target.num_classes), generator=generator
            ).to(target.device).requires_grad_(True)
            variables.append(logits)
        optimizer = torch.optim.LBFGS(
            variables,
            lr=1.0,
            max_iter=min(20, self.max_iterations),
            max_eval=4 * min(20, self.max_iterations),
            history_size=self.history_size,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def soft_targets() -> torch.Tensor:
            return fixed_targets if logits is None else torch.softmax(logits, dim=1)

        best = _Best(math.inf, images.detach().clone(), soft_targets().detach().argmax(dim=1))

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            simulated = gradient_equivalent_update(
                target.model, target.params, images, soft_targets(), target.training,
                create_graph=True,
            )
            loss = _DISTANCES[self.distance](simulated, target.observed)
            value = float(loss.detach())
            if value < best.loss:  # every evaluated point counts, line search included
                best.loss, best.images = value, images.detach().clone()
                best.labels = soft_targets().detach().argmax(dim=1)
            loss.backward()
            return loss

        iterations, stopped, previous = 0, False, math.inf
        while iterations < self.max_iterations:
            if time.monotonic() >= deadline:
                stopped = True
                break
            optimizer.step(closure)
            iterations = int(optimizer.state[images].get("n_iter", iterations + 1))
            current = best.loss
            if not math.isfinite(current) or current >= previous * (1 - 1e-7):
                break  # converged or stalled
            previous = current
        return best.images, best.labels, best.loss, iterations, stopped


class IDLG(DLG):
    """Improved DLG: label from the last layer's gradient, then L-BFGS on the image."""

    def __init__(
        self,
        max_iterations: int = 300,
        history_size: int = 100,
        distance: str = "l2",
        name: str | None = None,
    ) -> None:
        super().__init__(max_iterations, history_size, True, distance, name)
