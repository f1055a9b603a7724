"""The view of an update that the protections in force leave to the server.

Order of operations follows DP-FedAvg (McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018, Alg. 1) with secure aggregation:

1. each client clips its update ``Δᵢ`` to L2 norm ``C`` (the clipping norm):
   ``Δᵢ · min(1, C / ‖Δᵢ‖)``;
2. the server learns only the sum over the ``n`` clients of an aggregate (``n = 1``:
   no SecAgg, the server sees one client's update), plus Gaussian noise of standard
   deviation ``z · C`` per coordinate (``z`` the noise multiplier; added centrally, or
   in shares by the clients under distributed DP — the server sees the same sum);
3. it divides by ``n``: the observed update is the noisy mean.

With ``n = 1`` and ``z > 0`` this is also the view of an update under local DP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flwr_guard.audit.update import update_norm


@dataclass(frozen=True)
class Protections:
    """The protections in force between a client's update and the server's eyes.

    Attributes:
        clipping_norm: ``C`` (L2, in update units) or ``None`` for no clipping.
        noise_multiplier: ``z >= 0``; the noise standard deviation is ``z · C``.
        aggregate_size: ``n >= 1``, clients summed before the server sees anything
            (SecAgg+'s cohort; 1 = the server sees each reply).

    Raises:
        ValueError: for ``C <= 0``, ``z < 0``, ``n < 1``, or ``z > 0`` without ``C``
            (the noise scale is relative to the clipping norm).
    """

    clipping_norm: float | None = None
    noise_multiplier: float = 0.0
    aggregate_size: int = 1

    def __post_init__(self) -> None:
        if self.clipping_norm is not None and not self.clipping_norm > 0:
            raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clipping_norm is None:
            raise ValueError("noise_multiplier > 0 needs a clipping_norm (noise std is z * C)")
        if self.aggregate_size < 1:
            raise ValueError(f"aggregate_size must be >= 1, got {self.aggregate_size}")

    @classmethod
    def from_dpsgd(
        cls, max_grad_norm: float, noise_multiplier: float, learning_rate: float,
        aggregate_size: int = 1,
    ) -> Protections:
        """The view of one DP-SGD step (Abadi et al. 2016, Alg. 1) on a probe of batch
        size 1: the update ``−η (clip(g, C_g) + N(0, σ² C_g²))`` is an update clipped to
        ``η·C_g`` with noise multiplier ``σ`` — exact for one sample and one step, and
        an approximation (batch clipping instead of per-example) for larger probes.

        Args:
            max_grad_norm: Opacus' per-example clipping norm ``C_g``.
            noise_multiplier: Opacus' ``σ``.
            learning_rate: the local SGD step size ``η``.
            aggregate_size: clients summed by SecAgg+ before the server sees anything.
        """
        return cls(learning_rate * max_grad_norm, noise_multiplier, aggregate_size)

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``"clip C=1 + DP z=0.1 + SecAgg n=4"``."""
        parts = []
        if self.clipping_norm is not None and self.noise_multiplier == 0:
            parts.append(f"clip C={self.clipping_norm:g}")
        if self.noise_multiplier > 0:
            parts.append(f"DP z={self.noise_multiplier:g} C={self.clipping_norm:g}")
        if self.aggregate_size > 1:
            parts.append(f"SecAgg n={self.aggregate_size}")
        return " + ".join(parts) or "none"


def clip_update(update: list[torch.Tensor], clipping_norm: float | None) -> list[torch.Tensor]:
    """Scale ``update`` to global L2 norm at most ``clipping_norm`` (``None``: unchanged)."""
    if clipping_norm is None:
        return [u.clone() for u in update]
    factor = torch.clamp(clipping_norm / (update_norm(update) + 1e-12), max=1.0)
    return [u * factor for u in update]


def observed_update(
    updates: list[list[torch.Tensor]],
    protections: Protections,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The server's view: noisy mean of the clipped updates of one aggregate.

    Args:
        updates: ``n`` client updates (``n == protections.aggregate_size``), each a
            list of tensors with the same shapes; in update units (``θ_T − θ₀``).
        protections: clipping norm, noise multiplier, aggregate size.
        generator: CPU generator seeding the Gaussian noise (drawn on CPU, then moved
            to the updates' device, so a seed gives the same noise on any device).

    Returns:
        ``(Σᵢ clip(Δᵢ) + N(0, (z·C)² I)) / n``, same shapes as one update.

    Raises:
        ValueError: if ``len(updates) != protections.aggregate_size``.
    """
    if len(updates) != protections.aggregate_size:
        raise ValueError(
            f"expected {protections.aggregate_size} updates (aggregate size), got {len(updates)}"
        )
    total = [torch.zeros_like(u) for u in updates[0]]
    for update in updates:
        for acc, part in zip(total, clip_update(update, protections.clipping_norm)):
            acc += part
    if protections.noise_multiplier > 0:
        if protections.clipping_norm is None:  # Protections refuses noise without clipping
            raise ValueError("noise_multiplier > 0 needs a clipping_norm")
        clip = float(protections.clipping_norm)
        std = protections.noise_multiplier * clip
        for acc in total:
            noise = torch.randn(acc.shape, generator=generator, dtype=acc.dtype)
            acc += std * noise.to(acc.device)
    return [acc / protections.aggregate_size for acc in total]
