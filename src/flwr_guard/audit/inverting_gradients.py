"""Inverting Gradients (Geiping et al., NeurIPS 2020) and its FedAvg variant.

Geiping et al., "Inverting Gradients — How easy is it to break privacy in federated
learning?", NeurIPS 2020:

- objective (Sec. 4, Eq. 4): cosine distance between the simulated and the observed
  update, plus ``tv ·`` total variation of the image (``tv = 0`` is a variant: on
  8x8 images TV mostly blurs strokes away);
- optimiser: Adam on the *signed* gradient of the image, learning rate 0.1 decayed by
  10x at 3/8, 5/8 and 7/8 of the iterations, images boxed to ``[0, 1]`` after each step;
  several random restarts, the one with the lowest cosine distance is kept (the
  attacker's own criterion — it never sees the data);
- labels: read off the last layer's gradient first (iDLG rule for one image, the
  signed-count rule of :mod:`flwr_guard.audit.labels` for several);
- FedAvg (Sec. 5): with ``simulate_local_steps`` the attacker reproduces the client's
  ``T`` local SGD steps on the dummy images and differentiates through all of them;
  without it, it matches the update as if it were one gradient (an attacker who
  ignores local training).

On ``N > 1`` images it optimises the whole batch jointly with the inferred label
multiset: this is the batch-aware attack, and also what an aggregate of a few clients
under SecAgg looks like to the server (one update from ``n · B`` images).
"""

from __future__ import annotations

import math
import time

import torch

from flwr_guard.audit.attack import Attack, AttackTarget, random_images
from flwr_guard.audit.matching import cosine_distance, total_variation
from flwr_guard.audit.update import LocalTraining, gradient_equivalent_update


class InvertingGradients(Attack):
    """Inverting Gradients: cosine distance + TV prior, signed Adam, restarts.

    Args:
        iterations: Adam steps per restart.
        restarts: independent random initialisations (>= 1).
        tv: total-variation weight (>= 0; 0 disables the prior).
        learning_rate: Adam step size before decay.
        simulate_local_steps: differentiate through the client's local steps (FedAvg
            variant); otherwise model the update as one gradient.
        prior_weight: weight ``λ >= 0`` of a Gaussian image prior
            ``λ · mean((x − μ)²)`` around the target's ``prior_mean`` ``μ`` (the
            population's mean image, public knowledge). With ``λ > 0`` the images start
            at ``μ`` instead of noise: a MAP attacker whose guess falls back to the
            mean image when the update carries no information.
        name: how the attack is reported.

    Raises:
        ValueError: for ``iterations < 1``, ``restarts < 1``, ``tv < 0`` or
            ``prior_weight < 0``; at run time, ``prior_weight > 0`` on a target without
            a ``prior_mean``.
    """

    def __init__(
        self,
        iterations: int = 400,
        restarts: int = 2,
        tv: float = 1e-2,
        learning_rate: float = 0.1,
        simulate_local_steps: bool = True,
        prior_weight: float = 0.0,
        name: str = "ig",
    ) -> None:
        if iterations < 1 or restarts < 1 or tv < 0 or prior_weight < 0:
            raise ValueError(
                "need iterations >= 1, restarts >= 1, tv >= 0, prior_weight >= 0; got "
                f"{iterations}, {restarts}, {tv}, {prior_weight}"
            )
        self.prior_weight = prior_weight
        self.iterations = iterations
        self.restarts = restarts
        self.tv = tv
        self.learning_rate = learning_rate
        self.simulate_local_steps = simulate_local_steps
        self.name = name

    def _run(
        self, target: AttackTarget, generator: torch.Generator, deadline: float
    ) -> tuple[torch.Tensor, torch.Tensor, float, int, bool]:
        if self.prior_weight > 0 and target.prior_mean is None:
            raise ValueError(f"attack {self.name!r} needs the target's prior_mean")
        labels = target.inferred_labels()
        training = target.training
        if not self.simulate_local_steps:
            training = LocalTraining(local_steps=1, learning_rate=training.learning_rate)
        best_images, best_loss, iterations, stopped = None, math.inf, 0, False
        for _ in range(self.restarts):
            if best_images is not None and time.monotonic() >= deadline:
                stopped = True
                break
            images, loss, done, cut = self._one_restart(
                target, labels, training, generator, deadline
            )
            iterations += done
            stopped = stopped or cut
            if best_images is None or loss < best_loss:
                best_images, best_loss = images, loss
        assert best_images is not None
        return best_images, labels, best_loss, iterations, stopped

    def _one_restart(
        self,
        target: AttackTarget,
        labels: torch.Tensor,
        training: LocalTraining,
        generator: torch.Generator,
        deadline: float,
    ) -> tuple[torch.Tensor, float, int, bool]:
        prior = None
        if self.prior_weight > 0:
            if target.prior_mean is None:
                raise ValueError("prior_weight > 0 needs the target's prior_mean (a mean image)")
            prior = target.prior_mean.to(target.device).expand(
                target.num_images, *target.image_shape
            )
            images = prior.clone().requires_grad_(True)
        else:
            images = random_images(target, generator).clamp_(0.0, 1.0).requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=self.learning_rate)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        done, stopped = 0, False
        for _ in range(self.iterations):
            if time.monotonic() >= deadline:
                stopped = True
                break
            optimizer.zero_grad()
            simulated = gradient_equivalent_update(
                target.model, target.params, images, labels, training, create_graph=True
            )
            loss = cosine_distance(simulated, target.observed)
            if self.tv > 0 and images.dim() == 4:  # TV is an image prior
                loss = loss + self.tv * total_variation(images)
            if prior is not None:
                loss = loss + self.prior_weight * ((images - prior) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, [images])
            images.grad = grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                images.clamp_(0.0, 1.0)
            done += 1
        simulated = gradient_equivalent_update(
            target.model, target.params, images.detach(), labels, training
        )
        final = float(cosine_distance(simulated, target.observed))
        return images.detach(), final, done, stopped
