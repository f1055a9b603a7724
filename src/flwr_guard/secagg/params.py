"""SecAgg+ parameters: graph degree, threshold, quantisation and modulus.

Names follow Flower's ``SecAggPlusWorkflow``: ``num_shares`` (k, the number of
neighbours each client secret-shares with and masks against) and
``reconstruction_threshold`` (t, the number of shares that reconstruct a secret).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

logger = logging.getLogger(__name__)

DEFAULT_MAX_WEIGHT = 2**11
"""Default W: 2048 examples per client. The reference app's clients send at most
their share of the 1797 digits' training pool (and 1 with user-level DP). With
L = 2^16 it keeps the modulus at 32 bits up to 31 clients (2^12 did only up to 15)."""

_warned: set[tuple[int, int, int, int]] = set()


# Defaults of the SecAgg+ threat model (docs/secagg.md, "Parameters from the theory").
DEFAULT_CORRUPT_FRACTION = 0.05
"""gamma: fraction of the *federation* (the roster) that may be corrupt (run by or colluding
with the server). A client turns it into an absolute bound C = ceil(gamma x roster size)
(:func:`colluders_for`), never into a fraction of the cohort the server picks."""
DEFAULT_MIN_HONEST_OTHERS = 2
"""h: the fewest honest members besides the client itself that every sum it joins must
hold beyond the C colluders: a sum is unmasked only over at least C + 1 + h inputs."""
DEFAULT_DROPOUT_FRACTION = 1 / 3
"""delta: fraction of the cohort that may drop out of a round (corrupt clients that stop
answering count here too)."""
DEFAULT_SECURITY_BITS = 40
"""sigma: a round leaks an honest client's update with probability at most 2^-sigma."""
DEFAULT_CORRECTNESS_FAILURE = 0.01
"""eta: with delta n random dropouts a round aborts with probability at most eta."""


def _tail_exceeds(population: int, marked: int, draws: int, above: int) -> tuple[int, int]:
    """Exact P[X > above] for X ~ Hypergeometric(population, marked, draws), as the
    fraction ``(numerator, denominator)`` of Python integers (no rounding)."""
    den = math.comb(population, draws)
    num = sum(
        math.comb(marked, x) * math.comb(population - marked, draws - x)
        for x in range(above + 1, min(marked, draws) + 1)
    )
    return num, den


def colluders_for(federation_size: int, corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION) -> int:
    """C = ceil(gamma x federation size): the absolute number of members that may collude
    with the server (gamma as written in decimal, so 0.05 x 40 is exactly 2).

    Raises:
        ValueError: a negative size or gamma outside [0, 1).
    """
    if federation_size < 0 or not 0 <= corrupt_fraction < 1:
        raise ValueError(f"need a size >= 0 and gamma in [0, 1), got {federation_size}, {corrupt_fraction}")
    return math.ceil(Fraction(repr(float(corrupt_fraction))) * int(federation_size))


def min_sum_size(colluders: int, min_honest_others: int = DEFAULT_MIN_HONEST_OTHERS) -> int:
    """The fewest inputs a sum may hold so that, with ``colluders`` of them corrupt, each
    honest input is summed with at least ``min_honest_others`` other honest ones:
    ``C + 1 + h``."""
    return int(colluders) + 1 + int(min_honest_others)


@functools.lru_cache(maxsize=1024)
def tolerated_corrupt_neighbours(
    num_clients: int,
    num_shares: int,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    security_bits: int = DEFAULT_SECURITY_BITS,
    colluders: int | None = None,
) -> int:
    """c: the number of corrupt neighbours each client must tolerate.

    With C corrupt clients in the cohort (``colluders``, the absolute bound; default
    ``ceil(gamma n)``: the cohort taken as the whole federation), at most n - 1 of them
    besides the client, and each client's k neighbours a uniform
    k-subset of the other n - 1 (the random graph of :mod:`~flwr_guard.secagg.graph`
    over an ordering no party can choose), the number of corrupt neighbours of one
    client is Hypergeometric(n - 1, C, k). ``c`` is the smallest integer with
    ``n * P[X > c] <= 2^-sigma`` (a union bound over the n clients; exact integer
    arithmetic). For the complete graph (k = n - 1) it is C itself.
    Bell et al., CCS 2020, section 3.2 (Theorem 3.6's choice of k and t for corrupt
    fraction gamma and statistical security sigma), with the exact tail instead of
    their Chernoff bound. The server may put all C colluders into a small cohort: the
    tail is for C marked among the cohort's n - 1 others, whatever n it picks.

    Raises:
        ValueError: for k outside [1, n - 1], gamma outside [0, 1) or C < 0.
    """
    n, k = int(num_clients), int(num_shares)
    if not 1 <= k <= n - 1:
        raise ValueError(f"num_shares must be in [1, n - 1 = {n - 1}], got {k}")
    if not 0 <= corrupt_fraction < 1:
        raise ValueError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction}")
    if colluders is not None and colluders < 0:
        raise ValueError(f"colluders must be >= 0, got {colluders}")
    corrupt = min(n - 1, colluders_for(n, corrupt_fraction) if colluders is None else int(colluders))
    bound = 2 ** int(security_bits)
    for c in range(min(corrupt, k) + 1):
        num, den = _tail_exceeds(n - 1, corrupt, k, c)
        if n * num * bound <= den:
            return c
    return min(corrupt, k)


def max_degree(num_clients: int, num_shares: int) -> int:
    """The most neighbours a client gets: k, or k + 1 for odd k and odd n (no k-regular
    graph exists then: :func:`~flwr_guard.secagg.graph.neighbours`), at most n - 1."""
    n, k = int(num_clients), int(num_shares)
    return min(n - 1, k + 1 if k % 2 and n % 2 and k < n - 1 else k)


def minimum_threshold(num_shares: int, corrupt_neighbours: int) -> int:
    """The smallest t with ``2t > k + c``.

    A server that tells some of a client's neighbours "it survived" and others "it
    dropped" gets t shares of its self-mask seed and t of its mask key only if
    ``2t <= (k - c) + 2c = k + c``: the c corrupt holders reveal both kinds, honest
    ones one kind each (Bonawitz et al., CCS 2017, section 4.4, t > 2n/3 in the
    active model; here for a neighbourhood of k with c corrupt).
    """
    return (int(num_shares) + int(corrupt_neighbours)) // 2 + 1


@dataclass(frozen=True)
class ParameterChoice:
    """(k, t) for a cohort, with what they guarantee (see :func:`choose_parameters`).

    Attributes:
        num_shares: k.
        reconstruction_threshold: t = floor((k + c) / 2) + 1.
        corrupt_neighbours: c, corrupt neighbours tolerated per client.
        security_failure: upper bound (union bound) on the probability that some
            client has more than c corrupt neighbours (the only way 2t > k + c fails).
        correctness_failure: upper bound on the probability that ``delta n`` random
            dropouts leave some client with fewer than t live neighbours (the round
            aborts then: nothing is released).
    """

    num_shares: int
    reconstruction_threshold: int
    corrupt_neighbours: int
    security_failure: float
    correctness_failure: float


def failure_probabilities(
    num_clients: int,
    num_shares: int,
    reconstruction_threshold: int,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    dropout_fraction: float = DEFAULT_DROPOUT_FRACTION,
    colluders: int | None = None,
) -> tuple[float, float]:
    """Union bounds ``(security, correctness)`` for (n, k, t), exact hypergeometric tails.

    security: P[some client has more than 2t - k - 1 corrupt neighbours] (then 2t > k + c
    can fail for it), with ``colluders`` corrupt clients (default ``ceil(gamma n)``).
    correctness: P[``floor(delta n)`` random dropouts leave some client with more than
    k - t dropped neighbours]. Each is ``min(1, n * tail)``.
    """
    n, k, t = int(num_clients), int(num_shares), int(reconstruction_threshold)
    corrupt = min(n - 1, colluders_for(n, corrupt_fraction) if colluders is None else int(colluders))
    num, den = _tail_exceeds(n - 1, corrupt, k, 2 * t - k - 1)
    security = min(1.0, n * num / den)
    dropped = math.floor(dropout_fraction * n)
    num, den = _tail_exceeds(n - 1, dropped, k, k - t)
    return security, min(1.0, n * num / den)


@functools.lru_cache(maxsize=256)
def choose_parameters(
    num_clients: int,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    dropout_fraction: float = DEFAULT_DROPOUT_FRACTION,
    security_bits: int = DEFAULT_SECURITY_BITS,
    correctness_failure: float = DEFAULT_CORRECTNESS_FAILURE,
    colluders: int | None = None,
) -> ParameterChoice:
    """The smallest k (and its t) meeting both bounds, after Bell et al. (CCS 2020,
    section 3.2, Theorem 3.6 and its parameter choice), for at most ``colluders``
    corrupt clients (the absolute bound C; default ``ceil(gamma n)``, the cohort taken
    as the whole federation).

    For each k from 2 up: c from :func:`tolerated_corrupt_neighbours` (security
    2^-sigma), t = :func:`minimum_threshold` (2t > k + c), and the first k whose
    dropout bound (:func:`failure_probabilities`) is at most eta. The complete graph
    (k = n - 1) is the fallback; where even it cannot meet eta, the bound it gives is
    reported (a round may then abort more often than eta: documented, not hidden).

    Raises:
        ValueError: for fewer than 2 clients or fractions outside [0, 1).
    """
    n = int(num_clients)
    if n < 2:
        raise ValueError(f"SecAgg+ needs at least 2 clients, got {n}")
    if not 0 <= dropout_fraction < 1:
        raise ValueError(f"dropout_fraction must be in [0, 1), got {dropout_fraction}")
    best: ParameterChoice | None = None
    for k in range(min(2, n - 1), n):
        if max_degree(n, k) != k:
            continue  # odd k, odd n: some clients would get k + 1 neighbours
        c = tolerated_corrupt_neighbours(n, k, corrupt_fraction, security_bits, colluders)
        t = minimum_threshold(k, c)
        if t > k or (t < 2 and n > 2):
            continue
        security, correctness = failure_probabilities(
            n, k, t, corrupt_fraction, dropout_fraction, colluders
        )
        best = ParameterChoice(k, t, c, security, correctness)
        if correctness <= correctness_failure:
            return best
    if best is None:  # n = 2 or 3 with corrupt clients: only the complete graph
        k = n - 1
        c = tolerated_corrupt_neighbours(n, k, corrupt_fraction, security_bits, colluders)
        t = min(k, minimum_threshold(k, c))
        security, correctness = failure_probabilities(
            n, k, t, corrupt_fraction, dropout_fraction, colluders
        )
        best = ParameterChoice(k, t, c, security, correctness)
    return best


def default_num_shares(num_clients: int) -> int:
    """k for a cohort of ``num_clients`` with the default gamma, delta, sigma, eta
    (:func:`choose_parameters`)."""
    return choose_parameters(num_clients).num_shares


def default_threshold(num_shares: int, num_clients: int | None = None) -> int:
    """t for k = ``num_shares`` in a cohort of ``num_clients`` (default: k + 1, the
    complete graph) with the default corrupt fraction of a federation that is the
    cohort (C = ceil(gamma n)): floor((k + c) / 2) + 1."""
    n = num_shares + 1 if num_clients is None else num_clients
    return min(num_shares, minimum_threshold(
        num_shares, tolerated_corrupt_neighbours(n, num_shares)
    ))


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
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(f"clipping_range must be finite and > 0, got {self.clipping_range}")
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
        corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
        dropout_fraction: float = DEFAULT_DROPOUT_FRACTION,
        max_colluders: int | None = None,
        federation_size: int | None = None,
    ) -> SecAggParams:
        """Parameters for ``num_clients`` clients, with the smallest modulus that fits.

        The sum of the masked vectors is ``sum_i w_i q_i + noise`` with ``w_i <= W``,
        ``q_i <= L``: it fits in b bits if ``n * (W * L + extra_headroom) < 2^b``
        (``extra_headroom``: per-client bound of anything else added, e.g. DP noise).
        k and t not given come from :func:`choose_parameters` with ``corrupt_fraction``
        and ``dropout_fraction`` for at most C colluders: ``max_colluders``, else
        ``ceil(gamma x federation_size)`` (default: the cohort is the federation). Match
        the clients' policy (their C comes from the roster): they refuse a lower t.
        32 bits are used when that holds, else 64 bits, which doubles the masked vector
        (the upload): a warning (logger ``flwr_guard.secagg.params``, once per
        parameter set) then names the largest ``max_weight`` that keeps 32 bits.

        Raises:
            ValueError: if even 64 bits could wrap, or for invalid parameters.
        """
        if num_clients < 2:
            raise ValueError(f"SecAgg+ needs at least 2 clients, got {num_clients}")
        colluders = (
            int(max_colluders) if max_colluders is not None
            else colluders_for(max(num_clients, federation_size or 0), corrupt_fraction)
        )
        if num_shares:
            k = min(num_shares, num_clients - 1)
            degree = max_degree(num_clients, k)
            t = reconstruction_threshold or minimum_threshold(degree, tolerated_corrupt_neighbours(
                num_clients, degree, corrupt_fraction, colluders=colluders
            ))
        else:
            choice = choose_parameters(
                num_clients, corrupt_fraction, dropout_fraction, colluders=colluders
            )
            k, t = choice.num_shares, reconstruction_threshold or choice.reconstruction_threshold
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
    def from_dict(cls, data: object) -> SecAggParams:
        """Parse parameters from a (possibly hostile) message: exact types and bounded
        ranges are checked before anything is allocated.

        Raises:
            ValueError: a field is missing, of another type (bools are not integers),
                out of range (k, t, W <= 2^20, L <= 2^32), or non-finite.
        """
        if not isinstance(data, dict):
            raise ValueError("SecAgg+ parameters are not a mapping")

        def integer(name: str, high: int) -> int:
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise ValueError(f"SecAgg+ parameter {name!r} must be an integer in [0, {high}], got {value!r}")
            return value

        clip = data.get("clipping_range")
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not math.isfinite(clip):
            raise ValueError(f"SecAgg+ parameter 'clipping_range' must be a finite number, got {clip!r}")
        return cls(
            num_shares=integer("num_shares", MAX_NUM_SHARES),
            reconstruction_threshold=integer("reconstruction_threshold", MAX_NUM_SHARES),
            clipping_range=float(clip),
            quantization_range=integer("quantization_range", 2**32),
            max_weight=integer("max_weight", 2**20),
            modulus_bits=integer("modulus_bits", 64),
        )


MAX_NUM_SHARES = 2**16
"""Largest k any message may carry (bounds every per-neighbour allocation)."""


ROSTER_TABLE_SIZES = (3, 4, 5, 6, 8, 10, 15, 20, 21, 30, 40, 41, 50, 60, 80, 100, 150, 200, 300, 500, 750, 1000)
"""Roster sizes of the defaults table in docs/secagg.md (:func:`roster_defaults_table`)."""


@dataclass(frozen=True)
class RosterDefaults:
    """What a client's default policy accepts in a federation of ``roster_size``, and the
    server's default parameters for a cohort of the whole roster.

    Attributes:
        roster_size: R.
        colluders: C = ceil(gamma R).
        min_sum: C + 1 + h, the fewest inputs of a cohort or a signed survivor set.
        choice: the default (k, t) for n = R (:func:`choose_parameters` for C), or
            ``None`` where R < ``min_sum`` (every round is refused).
    """

    roster_size: int
    colluders: int
    min_sum: int
    choice: ParameterChoice | None


def roster_defaults(
    roster_size: int,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    min_honest_others: int = DEFAULT_MIN_HONEST_OTHERS,
) -> RosterDefaults:
    """The defaults of :class:`RosterDefaults` for a roster of ``roster_size``."""
    c = colluders_for(roster_size, corrupt_fraction)
    floor = max(3, min_sum_size(c, min_honest_others))
    choice = choose_parameters(roster_size, colluders=c) if roster_size >= floor else None
    return RosterDefaults(roster_size, c, floor, choice)


def _bound(value: float) -> str:
    return "0" if value == 0 else "1" if value >= 1 else f"{value:.1e}"


def roster_defaults_table(sizes: tuple[int, ...] = ROSTER_TABLE_SIZES) -> str:
    """The Markdown table of docs/secagg.md ("Defaults by roster size"), one row per size:
    C, the smallest sum, and for a cohort of the whole roster k, t, c, the losses the sum
    floor allows (R - min sum), the losses per neighbourhood (k - t) and the failure
    bounds of :func:`choose_parameters` (delta = 1/3 random dropouts)."""
    rows = [
        "| roster R | C = ceil(0.05 R) | smallest sum C + 3 | k | t | c | losses the sum floor allows | "
        "losses per neighbourhood (k - t) | security bound | abort bound (R/3 drop) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in sizes:
        d = roster_defaults(size)
        if d.choice is None:
            rows.append(f"| {size} | {d.colluders} | {d.min_sum} | refused: R < C + 3 | | | | | | |")
            continue
        ch = d.choice
        rows.append(
            f"| {size} | {d.colluders} | {d.min_sum} | {ch.num_shares} | {ch.reconstruction_threshold} "
            f"| {ch.corrupt_neighbours} | {size - d.min_sum} | {ch.num_shares - ch.reconstruction_threshold} "
            f"| {_bound(ch.security_failure)} | {_bound(ch.correctness_failure)} |"
        )
    return "\n".join(rows)
