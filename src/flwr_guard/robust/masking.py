"""A gradient-masking detector over paired attack results (no Flower imports).

The checks are the signs of masked (obfuscated) gradients listed by Athalye et al.,
ICML 2018, Sec. 3.1 and Carlini et al. 2019, "On Evaluating Adversarial Robustness",
Sec. 5-6. Every check compares attacks on the *same* examples, so each uses an exact
one-sided McNemar test (the discordant pairs under ``scipy.stats.binomtest``, p = 1/2)
rather than a raw difference of success rates:

- ``one-step-beats-iterative``: FGSM fools examples PGD does not, at the same eps;
- ``zeroth-order-beats-first-order``: a zeroth-order attack (SPSA, Square) fools
  examples PGD does not, at the same eps (also "random search finds what PGD misses");
- ``success-falls-with-eps``: PGD fools fewer examples at a larger eps (the balls are
  nested, so a working attack cannot do worse);
- ``unbounded-attack-fails``: PGD with eps = 1 (any image in ``[0, 1]``) leaves more than
  ``unbounded_tolerance`` of the examples correctly classified (no binomial test: a
  working attack reaches 100%).

A check fires when its p-value is below ``alpha`` (0.01 by default; no correction for
the number of checks, so a plain model has a false-alarm rate of at most about
``alpha`` per check). Inputs: ``fooled[(attack, eps)]`` bool arrays ``(N,)``, ``True``
where the example is misclassified after the attack (clean errors count as fooled for
every attack, and cancel out in the paired test).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import numpy as np
from scipy.stats import binomtest

ZEROTH_ORDER = ("spsa", "square")
UNBOUNDED_EPS = 1.0


@dataclass(frozen=True)
class Check:
    """One detector check: which comparison, its counts and whether it fired.

    Attributes:
        name: the check (see the module docstring).
        detail: which attacks / eps were compared.
        stronger: examples only the attack that should be weaker fooled (McNemar b).
        weaker: examples only the attack that should be stronger fooled (McNemar c).
        p_value: one-sided exact McNemar p-value (``nan`` for the unbounded check).
        fired: the check found a sign of masking.
    """

    name: str
    detail: str
    stronger: int
    weaker: int
    p_value: float
    fired: bool


@dataclass(frozen=True)
class MaskingVerdict:
    """The detector's result: ``suspected`` if any check fired."""

    suspected: bool
    checks: list[Check] = field(default_factory=list)
    alpha: float = 0.01

    @property
    def fired(self) -> list[str]:
        return [f"{c.name} ({c.detail})" for c in self.checks if c.fired]

    def to_dict(self) -> dict:
        return {"suspected": self.suspected, "alpha": self.alpha, "fired": self.fired,
                "checks": [asdict(c) for c in self.checks]}


def mcnemar_greater(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """One-sided exact McNemar test that ``a`` succeeds more often than ``b`` on the same
    examples: ``(#a-only, #b-only, p)``; ``p = 1`` when there are no discordant pairs."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results need equal shapes, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5, alternative="greater").pvalue)


def detect_masking(
    fooled: Mapping[tuple[str, float], np.ndarray],
    alpha: float = 0.01,
    unbounded_tolerance: float = 0.01,
) -> MaskingVerdict:
    """Run every check for which ``fooled`` holds the attacks it compares.

    Args:
        fooled: ``{(attack, eps): bool (N,)}``; attacks named ``fgsm``, ``pgd``, ``spsa``,
            ``square``; ``("pgd", 1.0)`` enables the unbounded check. All arrays must come
            from the same ``N`` examples in the same order.
        alpha: significance level of each paired test.
        unbounded_tolerance: share of examples an unbounded PGD may leave unbroken.

    Raises:
        ValueError: if the arrays differ in length, or no PGD result is given.
    """
    lengths = {np.asarray(v).shape for v in fooled.values()}
    if len(lengths) > 1:
        raise ValueError(f"all results must cover the same examples, got shapes {sorted(lengths)}")
    pgd_eps = sorted(e for a, e in fooled if a == "pgd" and e < UNBOUNDED_EPS)
    if not pgd_eps:
        raise ValueError("the detector needs PGD results at some eps < 1")
    checks: list[Check] = []

    def paired(name: str, detail: str, a: np.ndarray, b: np.ndarray) -> None:
        only_a, only_b, p = mcnemar_greater(a, b)
        checks.append(Check(name, detail, only_a, only_b, p, p < alpha))

    for eps in pgd_eps:
        if ("fgsm", eps) in fooled:
            paired("one-step-beats-iterative", f"fgsm vs pgd at eps {eps:g}",
                   fooled[("fgsm", eps)], fooled[("pgd", eps)])
        for attack in ZEROTH_ORDER:
            if (attack, eps) in fooled:
                paired("zeroth-order-beats-first-order", f"{attack} vs pgd at eps {eps:g}",
                       fooled[(attack, eps)], fooled[("pgd", eps)])
    for small, large in pairwise(pgd_eps):
        paired("success-falls-with-eps", f"pgd at eps {small:g} vs {large:g}",
               fooled[("pgd", small)], fooled[("pgd", large)])
    if ("pgd", UNBOUNDED_EPS) in fooled:
        result = np.asarray(fooled[("pgd", UNBOUNDED_EPS)], bool)
        unbroken = int((~result).sum())
        checks.append(Check("unbounded-attack-fails", "pgd at eps 1", unbroken, 0, float("nan"),
                            unbroken > unbounded_tolerance * result.size))
    return MaskingVerdict(any(c.fired for c in checks), checks, alpha)
