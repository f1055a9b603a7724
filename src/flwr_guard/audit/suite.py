"""The attacks an audit runs, by name, and which ones fit a situation.

| name | attack | threat it stands for |
| --- | --- | --- |
| ``dlg`` | DLG: L-BFGS, L2 distance, soft labels | the original attack on one gradient |
| ``idlg`` | iDLG: label from the gradient, L-BFGS, L2 | same, with the label leaked first |
| ``idlg-cos`` | iDLG with the cosine distance | an attacker who knows updates are clipped |
| ``ig`` | Inverting Gradients, TV prior | the strongest generic attack (ReLU nets) |
| ``ig-tv0`` | Inverting Gradients without TV | the same on tiny images, where TV blurs |
| ``ig-prior`` | Inverting Gradients with a mean-image prior | a MAP attacker who knows the population mean |
| ``ig-fedavg`` | Inverting Gradients through the local steps | updates after several local steps |
| ``analytic`` | closed form: fc-row (Phong 2017), imprint bins (Fowl 2022) | trap / imprint weights |

``analytic`` is added by the audit on its own whenever a linear layer of the model sees
the input (:mod:`flwr_guard.audit.analytic`); it needs no iterations. The TV prior of
the ``ig`` variants applies to images only (vectors: TV is skipped).

Every attack works on a batch of ``N >= 1`` images with the inferred label multiset
(the batch-aware attack, which is also the view of an aggregate of a few clients).
``effort`` scales every iteration count (1.0 = the defaults below).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr_guard.audit.analytic import AnalyticAttack
from flwr_guard.audit.attack import Attack
from flwr_guard.audit.dlg import DLG, IDLG
from flwr_guard.audit.inverting_gradients import InvertingGradients


def _scaled(base: int, effort: float) -> int:
    return max(1, round(base * effort))


ATTACKS: dict[str, Callable[[float], Attack]] = {
    "dlg": lambda e: DLG(max_iterations=_scaled(300, e)),
    "idlg": lambda e: IDLG(max_iterations=_scaled(300, e)),
    "idlg-cos": lambda e: IDLG(max_iterations=_scaled(300, e), distance="cosine"),
    "ig": lambda e: InvertingGradients(
        iterations=_scaled(600, e), restarts=2, tv=1e-2, simulate_local_steps=False, name="ig"
    ),
    "ig-tv0": lambda e: InvertingGradients(
        iterations=_scaled(600, e), restarts=2, tv=0.0, simulate_local_steps=False,
        name="ig-tv0",
    ),
    "ig-prior": lambda e: InvertingGradients(
        iterations=_scaled(300, e), restarts=1, tv=0.0, prior_weight=1.0, name="ig-prior"
    ),
    "analytic": lambda e: AnalyticAttack(),
    "ig-fedavg": lambda e: InvertingGradients(
        iterations=_scaled(600, e), restarts=2, tv=1e-2, simulate_local_steps=True,
        name="ig-fedavg",
    ),
}

DEFAULT_ATTACKS: tuple[str, ...] = ("idlg", "idlg-cos", "dlg", "ig", "ig-tv0", "ig-prior")


def attacks_for(local_steps: int, names: Sequence[str] | None = None) -> list[str]:
    """The attack names to run: ``names`` (or the defaults), plus ``ig-fedavg`` when the
    clients train for several local steps, minus it when they do not (it would repeat
    ``ig``).

    Raises:
        ValueError: for an unknown name.
    """
    chosen = list(names) if names else list(DEFAULT_ATTACKS)
    unknown = [n for n in chosen if n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {sorted(ATTACKS)}")
    if local_steps > 1 and "ig-fedavg" not in chosen and names is None:
        chosen.append("ig-fedavg")
    if local_steps == 1 and "ig-fedavg" in chosen:
        chosen.remove("ig-fedavg")
    return chosen


def build_attacks(names: Sequence[str], effort: float = 1.0) -> list[Attack]:
    """Instantiate the attacks called ``names`` with iteration counts scaled by ``effort``.

    Raises:
        ValueError: for an unknown name or ``effort <= 0``.
    """
    if not effort > 0:
        raise ValueError(f"effort must be > 0, got {effort}")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {sorted(ATTACKS)}")
    return [ATTACKS[n](effort) for n in names]
