"""A privacy budget that refuses steps it cannot afford, checkpointed to disk (no Flower).

:class:`PrivacyBudget` holds a :class:`~flwr_guard.dp.accounting.StepLedger` of the steps
already run, the maximum epsilon at a fixed delta, and the accountant that turns the
ledger into epsilon. Before a step (a federated round), :meth:`PrivacyBudget.can_afford`
answers whether running it would keep epsilon within the maximum; :meth:`spend`
records it and, with a checkpoint path, writes the ledger atomically (JSON) so that a
restarted server continues from the epsilon already spent instead of from zero.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr_guard.dp.accounting import AccountantKind, Sampling, StepLedger, epsilon_of_steps
from flwr_guard.dp.json_file import read_json, write_json_atomically
from flwr_guard.errors import FlwrGuardError

CHECKPOINT_VERSION = 1


class PrivacyBudgetExceeded(FlwrGuardError, RuntimeError):
    """Raised by :meth:`PrivacyBudget.spend` for a step the budget cannot afford."""


class CheckpointMismatch(FlwrGuardError, ValueError):
    """The checkpoint on disk was written for another delta, accountant or sampling."""


@dataclass(frozen=True)
class BudgetDecision:
    """The answer of :meth:`PrivacyBudget.can_afford`.

    Attributes:
        allowed: whether the step keeps epsilon ``<= max_epsilon``.
        epsilon_spent: epsilon of the ledger before the step.
        epsilon_after: epsilon if the step were run.
        max_epsilon: the budget.
    """

    allowed: bool
    epsilon_spent: float
    epsilon_after: float
    max_epsilon: float

    def message(self, what: str = "the next round") -> str:
        verb = "fits" if self.allowed else "would exceed"
        return (
            f"{what} {verb} the privacy budget: epsilon {self.epsilon_spent:.4g} spent, "
            f"{self.epsilon_after:.4g} after it, max {self.max_epsilon:.4g}"
        )


class PrivacyBudget:
    """Maximum epsilon at ``delta`` for a sequence of subsampled Gaussian steps.

    Args:
        max_epsilon: budget (``> 0``; ``inf`` = account without limit).
        delta: target delta in ``(0, 1)``.
        accountant: ``"rdp"`` or ``"pld"`` (see :mod:`flwr_guard.dp.accounting`).
        sampling: ``"poisson"`` or ``"fixed-size"``.
        checkpoint: JSON file holding the ledger; loaded if it exists, rewritten
            atomically after every :meth:`spend`. ``None`` keeps the ledger in memory.

    Raises:
        ValueError: for invalid parameters or an unreadable checkpoint.
        CheckpointMismatch: if the checkpoint was written with another delta,
            accountant or sampling (its epsilon would not be comparable).
    """

    def __init__(
        self,
        max_epsilon: float,
        delta: float,
        accountant: AccountantKind = "rdp",
        sampling: Sampling = "poisson",
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        if not max_epsilon > 0:
            raise ValueError(f"max epsilon must be > 0, got {max_epsilon}")
        epsilon_of_steps([], delta, accountant, sampling)  # validates the rest
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.accountant: AccountantKind = accountant
        self.sampling: Sampling = sampling
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.ledger = StepLedger()
        self.extra: dict[str, Any] = {}
        if self.checkpoint is not None and self.checkpoint.exists():
            self._load(self.checkpoint)

    # -- queries ------------------------------------------------------------------
    @property
    def epsilon_spent(self) -> float:
        return self.ledger.epsilon(self.delta, self.accountant, self.sampling)

    @property
    def num_steps(self) -> int:
        return self.ledger.num_steps

    def can_afford(
        self, noise_multiplier: float, sample_rate: float, count: int = 1,
        population: int | None = None, skellam: tuple[float, float, float] | None = None,
        leaving_shares: tuple[int, int] | None = None,
    ) -> BudgetDecision:
        """Whether ``count`` more steps with these parameters stay within the budget
        (``skellam``, ``leaving_shares``: see :class:`~flwr_guard.dp.accounting.Step`)."""
        spent = self.epsilon_spent
        trial = StepLedger(list(self.ledger.steps))
        trial.add(noise_multiplier, sample_rate, count, population, skellam, leaving_shares)
        after = trial.epsilon(self.delta, self.accountant, self.sampling)
        return BudgetDecision(
            allowed=after <= self.max_epsilon, epsilon_spent=spent,
            epsilon_after=after, max_epsilon=self.max_epsilon,
        )

    # -- updates ------------------------------------------------------------------
    def spend(
        self, noise_multiplier: float, sample_rate: float, count: int = 1,
        population: int | None = None, skellam: tuple[float, float, float] | None = None,
        leaving_shares: tuple[int, int] | None = None,
    ) -> float:
        """Record ``count`` steps; checkpoint; return the epsilon spent after them.

        Raises:
            PrivacyBudgetExceeded: if the steps do not fit (nothing is recorded).
        """
        decision = self.can_afford(noise_multiplier, sample_rate, count, population, skellam,
                                   leaving_shares)
        if not decision.allowed:
            raise PrivacyBudgetExceeded(decision.message("this step"))
        self.ledger.add(noise_multiplier, sample_rate, count, population, skellam, leaving_shares)
        self.save()
        return decision.epsilon_after

    def save(self) -> None:
        """Write the checkpoint (atomic rename); no-op without a checkpoint path."""
        if self.checkpoint is None:
            return
        data = {
            "version": CHECKPOINT_VERSION,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "max-epsilon": self.max_epsilon if math.isfinite(self.max_epsilon) else None,
            "epsilon-spent": self.epsilon_spent,
            "ledger": self.ledger.to_dict(),
            "extra": self.extra,
        }
        write_json_atomically(self.checkpoint, data, indent=1)

    def _load(self, path: Path) -> None:
        try:
            data = read_json(path)
            ledger = StepLedger.from_dict(data["ledger"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"cannot read the privacy checkpoint {path}: {err}") from err
        found = (data.get("delta"), data.get("accountant"), data.get("sampling"))
        if found != (self.delta, self.accountant, self.sampling):
            raise CheckpointMismatch(
                f"privacy checkpoint {path} was written for (delta, accountant, sampling) = "
                f"{found}, this run uses {(self.delta, self.accountant, self.sampling)}; "
                "use another checkpoint path or the same settings"
            )
        self.ledger = ledger
        self.extra = dict(data.get("extra") or {})
