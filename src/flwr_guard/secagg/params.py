"""SecAgg+ parameters: graph degree, threshold, quantisation and modulus.

Names follow Flower's ``SecAggPlusWorkflow``: ``num_shares`` (k, the number of
neighbours each client secret-shares with and masks against) and
``reconstruction_threshold`` (t, the number of shares that reconstruct a secret).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

DEFAULT_MAX_WEIGHT = 2**11
"""Default W: 2048 examples per client. The reference app's clients send at most
their share of the 1797 digits' training pool (and 1 with user-level DP). With
L = 2^16 it keeps the modulus at 32 bits up to 31 clients (2^12 did only up to 15)."""

_warned: set[tuple[int, int, int, int]] = set()


def default_num_shares(num_clients: int) -> int:
    """Neighbourhood size k for a cohort of ``num_clients``.

    The full graph (k = n - 1) for cohorts up to 10; above that the SecAgg+ sparse
    graph of Bell et al. (CCS 2020, section 3) with k = O(log n): here the even number
    closest above 3 * log2(n), which keeps the graph connected after the random
    dropouts Bell et al. analyse, with margin, at this scale (n <= a few thousand).
    """
    if num_clients < 2:
        raise ValueError(f"SecAgg+ needs at least 2 clients, got {num_clients}")
    if num_clients <= 10:
        return num_clients - 1
    k = 2 * math.ceil(1.5 * math.log2(num_clients))
    return min(k, num_clients - 1)


def default_threshold(num_shares: int) -> int:
    """t = floor(k/2) + 1, the smallest safe threshold: the most dropouts tolerated.

    t > k/2 means two disjoint sets of neighbours cannot both reach t, so a server
    cannot collect both kinds of share (self-mask seed and mask key) of one client
    even by telling different neighbours different stories; k - t = ceil(k/2) - 1
    neighbours of each client may drop (a third of the cohort, with margin).
    """
    return num_shares // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of one SecAgg+ round, sent to every client and bound into the transcript.

    Attributes:
        num_shares: k, neighbours per client (k = n - 1 is the full graph of SecAgg).
        reconstruction_threshold: t, shares needed to reconstruct a secret, 1 < t <= k.
        clipping_range: r; update coordinates are clipped to ``[-r, r]`` before
            quantisation.
        quantization_range: L; a clipped coordinate maps to an integer in ``[0, L]``
            by stochastic rounding, so one quantisation step is ``2r / L``.
        max_weight: W; the largest integer weight (number of examples) a client may
            send; a client with more refuses the round.
        modulus_bits: b; arithmetic is modulo 2^b (32 or 64). Chosen so that the sum of
            ``n`` weighted inputs, at most ``n * W * L``, cannot wrap (see
            :meth:`for_cohort`).
    """

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float = 2.0
    quantization_range: int = 2**16
    max_weight: int = DEFAULT_MAX_WEIGHT
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        if self.num_shares < 1:
            raise ValueError(f"num_shares must be >= 1, got {self.num_shares}")
        if not 1 < self.reconstruction_threshold <= self.num_shares and self.num_shares > 1:
            raise ValueError(
                "need 1 < reconstruction_threshold <= num_shares, got "
                f"{self.reconstruction_threshold} and {self.num_shares}"
            )
        if self.reconstruction_threshold * 2 <= self.num_shares:
            raise ValueError(
                f"reconstruction_threshold {self.reconstruction_threshold} must exceed "
                f"num_shares/2 = {self.num_shares / 2}: otherwise a server could gather "
                "both kinds of share of one client from two disjoint sets of neighbours"
            )
        if not self.clipping_range > 0:
            raise ValueError(f"clipping_range must be > 0, got {self.clipping_range}")
        if self.quantization_range < 1 or self.max_weight < 1:
            raise ValueError("quantization_range and max_weight must be >= 1")
        if self.modulus_bits not in (32, 64):
            raise ValueError(f"modulus_bits must be 32 or 64, got {self.modulus_bits}")

    @classmethod
    def for_cohort(
        cls,
        num_clients: int,
        num_shares: int | None = None,
        reconstruction_threshold: int | None = None,
        clipping_range: float = 2.0,
        quantization_range: int = 2**16,
        max_weight: int = DEFAULT_MAX_WEIGHT,
        extra_headroom: int = 0,
    ) -> SecAggParams:
        """Parameters for ``num_clients`` clients, with the smallest modulus that fits.

        The sum of the masked vectors is ``sum_i w_i q_i + noise`` with ``w_i <= W``,
        ``q_i <= L``: it fits in b bits if ``n * (W * L + extra_headroom) < 2^b``
        (``extra_headroom``: per-client bound of anything else added, e.g. DP noise).
        32 bits are used when that holds, else 64 bits, which doubles the masked vector
        (the upload): a warning (logger ``flwr_guard.secagg.params``, once per
        parameter set) then names the largest ``max_weight`` that keeps 32 bits.

        Raises:
            ValueError: if even 64 bits could wrap, or for invalid parameters.
        """
        k = min(num_shares or default_num_shares(num_clients), num_clients - 1)
        t = reconstruction_threshold or default_threshold(k)
        t = min(t, k)
        bound = num_clients * (max_weight * quantization_range + extra_headroom)
        if bound < 2**32:
            bits = 32
        elif bound < 2**64:
            bits = 64
            key = (num_clients, max_weight, quantization_range, extra_headroom)
            if key not in _warned:
                _warned.add(key)
                fits = ((2**32 - 1) // num_clients - extra_headroom) // quantization_range
                advice = (
                    f"lower max_weight to <= {fits} (or quantization_range) to keep 32 bits"
                    if fits >= 1
                    else "even max_weight 1 needs 64 bits: lower quantization_range"
                )
                logger.warning(
                    "SecAgg+: %d clients x (max_weight %d x quantization_range %d%s) does not "
                    "fit in 32 bits: the masked vector is 64-bit, twice the upload; %s",
                    num_clients, max_weight, quantization_range,
                    f" + headroom {extra_headroom}" if extra_headroom else "", advice,
                )
        else:
            raise ValueError(
                f"n * (W * L + headroom) = {bound} does not fit in 64 bits: lower "
                "quantization_range or max_weight"
            )
        return cls(k, t, clipping_range, quantization_range, max_weight, bits)

    @property
    def step(self) -> float:
        """One quantisation step, ``2r / L``: the bound on the averaging error."""
        return 2 * self.clipping_range / self.quantization_range

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int | float]) -> SecAggParams:
        return cls(
            num_shares=int(data["num_shares"]),
            reconstruction_threshold=int(data["reconstruction_threshold"]),
            clipping_range=float(data["clipping_range"]),
            quantization_range=int(data["quantization_range"]),
            max_weight=int(data["max_weight"]),
            modulus_bits=int(data["modulus_bits"]),
        )
