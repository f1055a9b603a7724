"""Which rounds and clients an audit runs on.

A (round, client) pair is audited when its round is sampled (probability
``round_fraction``) and the client is sampled within that round (probability
``client_fraction``). Both draws are SHA-256 hashes of ``(seed, round[, node id])``
mapped to ``[0, 1)``: every client decides alone, without coordination, and the same
seed gives the same decision on every run and device. Sampling whole rounds keeps the
overhead per round predictable: the clients of a sampled round audit in parallel, so a
round costs at most one audit time more, and on average ``round_fraction`` of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def _uniform(*parts: object) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def derived_seed(*parts: object) -> int:
    """A 31-bit seed derived from ``parts`` (SHA-256), the same on every run."""
    return int(_uniform("seed", *parts) * 2**31)


@dataclass(frozen=True)
class AuditSampling:
    """Fractions of rounds and of clients per sampled round that are audited.

    Attributes:
        round_fraction: probability that a round is audited, in ``[0, 1]``.
        client_fraction: probability that a client audits in a sampled round.
        seed: makes the draws reproducible.

    Raises:
        ValueError: for fractions outside ``[0, 1]``.
    """

    round_fraction: float = 0.1
    client_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("round_fraction", "client_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def expected_fraction(self) -> float:
        """Share of (round, client) pairs audited on average."""
        return self.round_fraction * self.client_fraction

    def round_sampled(self, server_round: int) -> bool:
        return _uniform(self.seed, "round", server_round) < self.round_fraction

    def sampled(self, server_round: int, node_id: int) -> bool:
        """Whether client ``node_id`` audits in ``server_round``."""
        return self.round_sampled(server_round) and (
            _uniform(self.seed, "client", server_round, node_id) < self.client_fraction
        )
