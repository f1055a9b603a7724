"""What every gradient-inversion attack takes and returns.

An attack sees what the server sees — the global weights it sent, the observed update
(after the protections in force) and how clients train — and returns images and labels.
It never sees the client's data; the audit scores its output against that data
afterwards (:mod:`flwr_guard.audit.scores`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from flwr_guard.audit.labels import class_signal, infer_labels
from flwr_guard.audit.update import LocalTraining, Params


@dataclass(frozen=True)
class AttackTarget:
    """The attacker's knowledge.

    Attributes:
        model: the architecture (its own weights are ignored; ``params`` are used).
        params: the global weights ``θ₀`` by name, on the attack's device.
        observed: the observed update in gradient-equivalent form, one tensor per
            entry of ``params`` (see :mod:`flwr_guard.audit.update`).
        training: local steps and learning rate of the clients.
        num_images: images behind the update (batch size × aggregate size).
        image_shape: the shape of one input without the batch dimension: ``(C, H, W)``
            for images, ``(features,)`` for vectors.
        num_classes: classes of the model's output.
        prior_mean: the population's mean image ``(C, H, W)`` in ``[0, 1]`` if the
            attacker knows it (public data), else ``None``.
    """

    model: nn.Module
    params: Params
    observed: list[torch.Tensor]
    training: LocalTraining
    num_images: int
    image_shape: tuple[int, ...]
    num_classes: int
    prior_mean: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def device(self) -> torch.device:
        return self.observed[0].device

    def inferred_labels(self) -> torch.Tensor:
        """Labels from the last layer's observed gradient (:mod:`labels`), on ``device``."""
        signal = class_signal(self.model, self.names, self.observed)
        return infer_labels(signal, self.num_images).to(self.device)


@dataclass
class Reconstruction:
    """An attack's output.

    Attributes:
        attack: the attack's name.
        images: float32 ``(N, C, H, W)`` clamped to ``[0, 1]``, on CPU.
        labels: int64 ``(N,)`` on CPU.
        loss: final value of the attack's own objective (lower is better).
        iterations: optimiser iterations run (all restarts).
        seconds: wall time.
        stopped_by_budget: the time budget ended the attack before its iterations.
    """

    attack: str
    images: torch.Tensor
    labels: torch.Tensor
    loss: float
    iterations: int
    seconds: float
    stopped_by_budget: bool


class Attack(ABC):
    """A gradient-inversion attack. Subclasses set ``name`` and implement :meth:`_run`."""

    name: str = "attack"

    def reconstruct(
        self, target: AttackTarget, generator: torch.Generator, deadline: float | None = None
    ) -> Reconstruction:
        """Reconstruct the images behind ``target.observed``.

        Args:
            target: what the attacker knows.
            generator: CPU generator seeding the dummy images (reproducible runs).
            deadline: ``time.monotonic()`` value at which to stop and return the best
                result so far (``None``: run every iteration).
        """
        start = time.monotonic()
        deadline = float("inf") if deadline is None else deadline
        images, labels, loss, iterations, stopped = self._run(target, generator, deadline)
        return Reconstruction(
            attack=self.name,
            images=images.detach().clamp(0.0, 1.0).float().cpu(),
            labels=labels.detach().long().cpu(),
            loss=float(loss),
            iterations=iterations,
            seconds=time.monotonic() - start,
            stopped_by_budget=stopped,
        )

    @abstractmethod
    def _run(
        self, target: AttackTarget, generator: torch.Generator, deadline: float
    ) -> tuple[torch.Tensor, torch.Tensor, float, int, bool]:
        """Return ``(images, labels, loss, iterations, stopped_by_budget)``."""


def random_images(target: AttackTarget, generator: torch.Generator) -> torch.Tensor:
    """Gaussian dummy images ``(N, C, H, W)`` on the target's device (DLG's and IG's
    ``randn`` initialisation), drawn from the CPU ``generator`` for reproducibility."""
    shape = (target.num_images, *target.image_shape)
    return torch.randn(shape, generator=generator).to(target.device)
