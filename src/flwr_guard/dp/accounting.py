"""Privacy accounting for subsampled Gaussian mechanisms (no Flower imports).

One accountant serves both levels of privacy in flwr-guard:

- **user level** (DP-FedAvg): one *step* is one federated round; the sample rate is the
  probability that a client takes part in a round; the noise multiplier is the noise
  standard deviation on the sum of clipped updates divided by the clipping norm;
- **record level** (DP-SGD): one step is one optimiser step; Opacus keeps that ledger
  (see :mod:`flwr_guard.dp.dpsgd`), and :func:`epsilon_of_steps` reads it.

The arithmetic is Google's ``dp-accounting`` library (RDP: Mironov 2017, Mironov, Talwar
& Zhang 2019; PLD: Koskela et al. 2020, Doroshenko et al. 2022). Nothing is hand-rolled:
this module only turns a ledger of ``(noise_multiplier, sample_rate, steps)`` into
``dp_accounting`` events.

Sampling assumptions (say which one matches your deployment):

- ``"none"``: no amplification: every step is accounted as if the individual took part
  (the Gaussian mechanism composed ``T`` times, add/remove-one neighbours). The only
  honest choice when the party who picks the cohort is the adversary (a malicious
  server under distributed DP), and the default of ``DPFedAvg``: Flower's ``FedAvg``
  samples a *fixed-size* cohort with ``random.sample``, not Poisson.
- ``"poisson"``: each client (record) is included independently with probability
  ``q`` by a sampler the adversary does not control; add/remove-one neighbours. This
  is what the RDP and PLD analyses of DP-SGD (Opacus' Poisson data loader) assume.
  Accounting Flower's fixed-size cohort as Poisson with ``q = cohort / population`` is
  a common approximation (McMahan et al. 2018, §3), not a bound.
- ``"fixed-size"``: a cohort of ``m`` out of a population of ``N`` drawn uniformly
  without replacement each step, analysed under the *replace-one* relation (Wang,
  Balle & Kasiviswanathan 2019, "Subsampled Rényi DP and Analytical Moments
  Accountant"). Replacing one client's clipped update changes the sum by up to
  ``2 * C``, so the Gaussian event is given the noise multiplier ``z / 2``. RDP only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from flwr_guard.dp.relation_accounting import ADD_REMOVE_ORDERS, add_remove_rdp
from flwr_guard.dp.skellam_accounting import (
    SKELLAM_ORDERS,
    epsilon_from_rdp,
    poisson_subsampled_rdp,
    skellam_rdp,
)

AccountantKind = Literal["rdp", "pld"]
Sampling = Literal["none", "poisson", "fixed-size"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
SAMPLINGS: tuple[str, ...] = ("none", "poisson", "fixed-size")

# What each sampling assumption means, for logs, docs and `flwr-guard epsilon`.
NEIGHBOURING = {
    "none": "add/remove one individual; no sampling amplification",
    "poisson": "add/remove one individual; Poisson sampling by a trusted sampler",
    "fixed-size": "replace one individual; fixed-size cohort without replacement",
}
CONVERSION = {
    "rdp": "RDP to (epsilon, delta) by dp-accounting's rdp_privacy_accountant."
           "compute_epsilon (Canonne-Kamath-Steinke 2020 / Asoodeh et al. 2020 bound)",
    "pld": f"PLD (Koskela et al. 2020) with pessimistic discretisation, value interval "
           f"{1e-3:g} (dp-accounting PLDAccountant)",
}

# PLD discretisation: dp-accounting's default (1e-4) is accurate to ~1e-3 in epsilon
# at a few seconds for thousands of steps; 1e-3 keeps the CLI and budget checks fast.
PLD_DISCRETIZATION = 1e-3


@dataclass(frozen=True)
class Step:
    """``count`` identical steps of a subsampled Gaussian (or Skellam) mechanism.

    Attributes:
        noise_multiplier: noise standard deviation / L2 sensitivity (``z >= 0``;
            0 means no noise, so epsilon is infinite).
        sample_rate: inclusion probability ``q`` in ``[0, 1]`` (``"poisson"``), or the
            cohort fraction ``m / N`` (``"fixed-size"``, where ``population`` is ``N``).
        count: number of steps (``>= 0``).
        population: ``N`` for ``"fixed-size"`` sampling; ignored otherwise.
        skellam: ``(L2 sensitivity, L1 sensitivity, mu of the sum)`` for a step of the
            Skellam mechanism (integer domain; :mod:`flwr_guard.dp.skellam_accounting`),
            ``None`` for a Gaussian step. ``noise_multiplier`` is then informational
            (``sqrt(2 mu) / L2``).
        leaving_shares: ``(n contributors, d coordinates)`` for a distributed-DP step
            accounted under add/remove of one client, whose noise share leaves with it
            (needs ``skellam``; :mod:`flwr_guard.dp.relation_accounting`); ``None``: the
            noise of the sum is the same in both neighbours (central noise, or the
            zero-out relation).
    """

    noise_multiplier: float
    sample_rate: float
    count: int = 1
    population: int | None = None
    skellam: tuple[float, float, float] | None = None
    leaving_shares: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.leaving_shares is not None:
            n, d = self.leaving_shares
            if self.skellam is None or n < 1 or d < 1:
                raise ValueError(f"leaving_shares (n >= 1, d >= 1) needs a Skellam step, got "
                                 f"{self.leaving_shares}")
        if self.skellam is not None:
            l2, l1, mu = self.skellam
            if not (l2 > 0 and l1 > 0 and mu > 0 and all(map(math.isfinite, self.skellam))):
                raise ValueError(f"Skellam step needs L2, L1 sensitivities and mu > 0, got {self.skellam}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {self.sample_rate}")
        if self.count < 0:
            raise ValueError(f"step count must be >= 0, got {self.count}")
        if self.population is not None and self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")


def _check(accountant: str, sampling: str, delta: float) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}: use one of {ACCOUNTANTS}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}: use one of {SAMPLINGS}")
    if sampling == "fixed-size" and accountant != "rdp":
        raise ValueError(
            "fixed-size (without replacement) sampling is analysed with RDP only; "
            "use accountant='rdp' or sampling='poisson'"
        )
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _event(step: Step, sampling: str) -> dp_event.DpEvent:
    if sampling == "none":
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(step.noise_multiplier),
                                            step.count)
    if sampling == "poisson":
        inner = dp_event.GaussianDpEvent(step.noise_multiplier)
        event: dp_event.DpEvent = dp_event.PoissonSampledDpEvent(step.sample_rate, inner)
    else:
        if step.population is None:
            raise ValueError("fixed-size sampling needs the population size N of every step")
        cohort = round(step.sample_rate * step.population)
        # Replace-one: the clipped sum moves by up to 2C, so sigma / sensitivity = z / 2.
        inner = dp_event.GaussianDpEvent(step.noise_multiplier / 2.0)
        event = dp_event.SampledWithoutReplacementDpEvent(step.population, cohort, inner)
    return dp_event.SelfComposedDpEvent(event, step.count)


def _fresh(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    relation = dp_accounting.NeighboringRelation
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(
            relation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION
        )
    return rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=relation.REPLACE_ONE
        if sampling == "fixed-size"
        else relation.ADD_OR_REMOVE_ONE
    )


def epsilon_of_steps(
    steps: Iterable[Step],
    delta: float,
    accountant: AccountantKind = "rdp",
    sampling: Sampling = "poisson",
) -> float:
    """Epsilon at ``delta`` of the composition of ``steps`` (``inf`` if any is noiseless).

    Args:
        steps: the ledger, in any order (composition is commutative).
        delta: target delta in ``(0, 1)``.
        accountant: ``"rdp"`` (dp-accounting ``RdpAccountant``) or ``"pld"``
            (``PLDAccountant``, tighter).
        sampling: ``"poisson"`` or ``"fixed-size"`` (see the module docstring).

    Returns:
        epsilon (``>= 0``); 0.0 for an empty ledger.

    Raises:
        ValueError: for an unknown accountant / sampling, delta outside ``(0, 1)``, or
            fixed-size sampling with PLD or without a population.
    """
    _check(accountant, sampling, delta)
    steps = [s for s in steps if s.count > 0 and (s.sample_rate > 0 or sampling == "none")]
    if not steps:
        return 0.0
    if any(s.skellam is not None for s in steps):
        return _epsilon_with_skellam(steps, delta, accountant, sampling)
    if any(s.noise_multiplier == 0 for s in steps):
        return math.inf
    acc = _fresh(accountant, sampling)
    acc.compose(dp_event.ComposedDpEvent([_event(s, sampling) for s in steps]))
    return float(acc.get_epsilon(delta))


def _epsilon_with_skellam(steps: list[Step], delta: float, accountant: str,
                          sampling: str) -> float:
    """Compose Gaussian, Skellam and add/remove (leaving-share) steps in RDP; dp-accounting
    converts.

    Skellam has no PLD here and no tight subsampled bound: ``"poisson"`` uses the generic
    bound of Zhu & Wang 2019 (Theorem 6), ``"fixed-size"`` is refused. Skellam's RDP is
    stated at integer orders; at a fractional order ``a`` it is bounded by its value at
    ``ceil(a)`` (Rényi divergence grows with the order; van Erven & Harremoës 2014,
    Theorem 3).
    """
    if accountant != "rdp":
        raise ValueError("the Skellam mechanism is accounted with its own RDP only "
                         "(Agarwal et al. 2021): use accountant='rdp'")
    if sampling == "fixed-size":
        raise ValueError("fixed-size sampling has no bound for Skellam here: use "
                         "sampling='none' (or 'poisson' with a trusted Poisson sampler)")
    integers = list(SKELLAM_ORDERS)
    leaving = any(s.leaving_shares is not None for s in steps)
    orders = list(ADD_REMOVE_ORDERS) if leaving else integers
    at_ceiling = [int(math.ceil(a)) - integers[0] for a in orders]
    gaussian = [s for s in steps if s.skellam is None]
    total = np.zeros(len(orders))
    if gaussian:
        if any(s.noise_multiplier == 0 for s in gaussian):
            return math.inf
        acc = rdp_privacy_accountant.RdpAccountant(
            orders=orders, neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc.compose(dp_event.ComposedDpEvent([_event(s, sampling) for s in gaussian]))
        total += np.asarray(acc._rdp, dtype=np.float64)
    for s in steps:
        if s.skellam is None:
            continue
        if s.leaving_shares is not None:
            if sampling == "poisson" and s.sample_rate < 1:
                raise ValueError("the add/remove accounting of distributed DP has no "
                                 "subsampled bound here: use sampling='none'")
            l2, _, mu = s.skellam
            n, d = s.leaving_shares
            total += s.count * add_remove_rdp(orders, l2, 2.0 * mu / n, n, d)
            continue
        rdp = skellam_rdp(integers, *s.skellam)
        if sampling == "poisson" and s.sample_rate < 1:
            rdp = poisson_subsampled_rdp(integers, rdp, s.sample_rate)
        total += s.count * rdp[at_ceiling]
    return epsilon_from_rdp(orders, total, delta)


def compute_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "rdp",
    sampling: Sampling = "poisson",
    population: int | None = None,
) -> float:
    """Epsilon after ``steps`` identical subsampled Gaussian steps.

    Args:
        noise_multiplier: ``z`` (noise std / L2 sensitivity), ``> 0``.
        sample_rate: ``q`` in ``(0, 1]``.
        steps: ``T >= 0`` (rounds for user-level DP, optimiser steps for DP-SGD).
        delta: target delta.
        accountant, sampling: see :func:`epsilon_of_steps`.
        population: ``N``, required for ``sampling="fixed-size"``.

    Example: ``compute_epsilon(1.5, 0.04, 2250, 1e-5)`` is about 7.33 (Opacus' RDP
    reference value 7.3291).
    """
    return epsilon_of_steps(
        [Step(noise_multiplier, sample_rate, steps, population)], delta, accountant, sampling
    )


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "rdp",
    sampling: Sampling = "poisson",
    population: int | None = None,
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier ``z`` whose epsilon after ``steps`` is ``<= target``.

    Uses ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` (bisection); for
    PLD the search is bracketed by the RDP answer.

    Raises:
        ValueError: for ``target_epsilon <= 0``, ``steps < 1`` or the errors of
            :func:`epsilon_of_steps`.
    """
    _check(accountant, sampling, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")

    def event(z: float) -> dp_event.DpEvent:
        return _event(Step(z, sample_rate, steps, population), sampling)

    def calibrate(kind: str, bracket: dp_accounting.BracketInterval) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _fresh(kind, sampling), event, target_epsilon, delta, bracket,
                tol=tolerance,
            )
        )

    z_rdp = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(1e-2, 1.0))
    if accountant == "rdp":
        return z_rdp
    # PLD is never looser than RDP, so z_pld <= z_rdp; PLD at tiny z is very slow, so
    # bracket from the RDP answer instead of searching up from 0.01.
    low = z_rdp / 2
    while epsilon_of_steps([Step(low, sample_rate, steps, population)], delta,
                               accountant, sampling) < target_epsilon:
        low /= 2
    return calibrate(accountant, dp_accounting.ExplicitBracketInterval(low, z_rdp))


@dataclass
class StepLedger:
    """The steps a mechanism has run so far, mergeable and serialisable.

    Consecutive steps with the same parameters are merged into one :class:`Step`
    (the ledger of 1000 identical rounds is one entry). ``to_dict``/``from_dict``
    round-trip through JSON (floats and ints only).
    """

    steps: list[Step] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, count: int = 1,
            population: int | None = None,
            skellam: tuple[float, float, float] | None = None,
            leaving_shares: tuple[int, int] | None = None) -> None:
        """Append ``count`` steps (merged with the last entry when identical)."""
        step = Step(noise_multiplier, sample_rate, count, population, skellam, leaving_shares)
        if self.steps:
            last = self.steps[-1]
            if (last.noise_multiplier, last.sample_rate, last.population, last.skellam,
                    last.leaving_shares) == (step.noise_multiplier, step.sample_rate,
                                             step.population, step.skellam, step.leaving_shares):
                self.steps[-1] = Step(last.noise_multiplier, last.sample_rate,
                                      last.count + count, last.population, last.skellam,
                                      last.leaving_shares)
                return
        self.steps.append(step)

    @property
    def num_steps(self) -> int:
        return sum(s.count for s in self.steps)

    def epsilon(self, delta: float, accountant: AccountantKind = "rdp",
                sampling: Sampling = "poisson") -> float:
        return epsilon_of_steps(self.steps, delta, accountant, sampling)

    def to_dict(self) -> dict[str, list]:
        return {
            "noise-multiplier": [s.noise_multiplier for s in self.steps],
            "sample-rate": [s.sample_rate for s in self.steps],
            "count": [s.count for s in self.steps],
            "population": [s.population or 0 for s in self.steps],
            "skellam": [list(s.skellam) if s.skellam else [] for s in self.steps],
            "leaving-shares": [list(s.leaving_shares) if s.leaving_shares else []
                               for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Sequence]) -> StepLedger:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ValueError: if the lists are missing or of different lengths, or hold
                invalid steps.
        """
        try:
            columns = [list(data[k]) for k in ("noise-multiplier", "sample-rate", "count")]
        except KeyError as err:
            raise ValueError(f"ledger misses the field {err.args[0]!r}") from None
        populations = list(data.get("population", [0] * len(columns[0])))
        skellams = list(data.get("skellam", [[]] * len(columns[0])))
        leaving = list(data.get("leaving-shares", [[]] * len(columns[0])))
        if len({len(c) for c in columns} | {len(populations), len(skellams), len(leaving)}) != 1:
            raise ValueError("ledger fields have different lengths")
        ledger = cls()
        for z, q, n, pop, sk, ls in zip(*columns, populations, skellams, leaving, strict=True):
            skellam = tuple(float(v) for v in sk) if sk else None
            if skellam is not None and len(skellam) != 3:
                raise ValueError(f"a Skellam step needs (L2, L1, mu), got {sk}")
            shares = (int(ls[0]), int(ls[1])) if ls else None
            ledger.steps.append(Step(float(z), float(q), int(n), int(pop) or None, skellam, shares))
        return ledger
