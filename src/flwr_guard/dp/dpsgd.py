"""Record-level DP-SGD for the user's training code, over Opacus (no Flower imports).

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1):
Poisson-sampled batches, every example's gradient clipped to ``max_grad_norm``,
Gaussian noise of std ``noise_multiplier * max_grad_norm`` added to the sum. Opacus
(``opacus.PrivacyEngine.make_private``) does all three; this module adds what a
federated client needs around it:

- **a budget the library enforces**: ``DPSGDConfig.max_epsilon`` (and ``delta``),
  checked in :meth:`DPSGD.make_private` *before* training with the accountant that
  reports epsilon (Opacus RDP or PRV, as configured); a round that would exceed it
  raises :class:`~flwr_guard.dp.budget.PrivacyBudgetExceeded` and the data is not
  touched;
- **a ledger that survives restarts**: the steps of every round go to a durable,
  node-local :class:`~flwr_guard.dp.record_ledger.RecordLedger` (written before
  training, so empty Poisson batches and crashed rounds count), mirrored in
  ``context.state`` by :mod:`flwr_guard.dp.context_state`;
- a model Opacus cannot handle (BatchNorm, ...) fails with :class:`DPSGDModelError`
  naming the fix (``opacus.validators.ModuleValidator.fix``);
- ghost clipping (Bu et al. 2022 / Opacus ``grad_sample_mode="ghost"``);
- the parameters come from the run config, bounded by the node's own policy
  (:meth:`DPSGDConfig.from_run_config`).

Typical use inside a ClientApp's ``train``::

    dpsgd = dpsgd_from_context(context, epochs=epochs)     # context_state adapter
    device = resolve_device(context.node_config.get("device"))
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    private = dpsgd.make_private(model, optimizer, trainloader)   # budget checked here
    for _ in range(epochs):
        for x, y in private.data_loader:
            if len(y) == 0:
                continue
            private.optimizer.zero_grad()
            private.criterion(private.module(x.to(device)), y.to(device)).backward()
            private.optimizer.step()
    metrics[ReplyMetrics.DP_SGD_EPSILON] = save_dpsgd(context, dpsgd)  # flwr_guard.keys
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch

from flwr_guard.config_values import choice
from flwr_guard.errors import FlwrGuardError

# Opacus calls logging.basicConfig() when imported (opacus/utils/module_utils.py): a root
# handler that prints every line of Flower's logger (which propagates) a second time.
# Keep the root logger as the application left it.
_root_handlers = list(logging.getLogger().handlers)
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.validators import ModuleValidator

for _handler in logging.getLogger().handlers:
    if _handler not in _root_handlers:
        logging.getLogger().removeHandler(_handler)
del _root_handlers
from torch import nn
from torch.utils.data import DataLoader

from flwr_guard.device import resolve_device  # noqa: F401 - re-exported for users
from flwr_guard.dp.budget import PrivacyBudgetExceeded
from flwr_guard.dp.node_policy import (
    dpsgd_max_epsilon,
    dpsgd_min_noise_multiplier,
    flag,
)
from flwr_guard.dp.record_ledger import (
    MAX_NOISE_MULTIPLIER,
    RecordLedger,
    append_steps,
    check_entry,
)
from flwr_guard.keys import NodeConfig, RunConfig

logger = logging.getLogger(__name__)

GradSampleMode = Literal["hooks", "ghost"]


class DPSGDModelError(FlwrGuardError, ValueError):
    """The model has layers Opacus cannot compute per-example gradients for."""


@dataclass(frozen=True)
class DPSGDConfig:
    """Parameters of DP-SGD.

    Attributes:
        noise_multiplier: ``sigma`` (noise std / ``max_grad_norm``), ``>= 0``.
        max_grad_norm: per-example L2 clipping norm ``C > 0``.
        delta: delta at which epsilon is reported and the budget is checked (``1e-5``
            by default; choose ``< 1 / examples per client``).
        grad_sample_mode: ``"hooks"`` (per-example gradients) or ``"ghost"`` (ghost
            clipping: per-example norms only, less memory).
        accountant: Opacus accountant, ``"rdp"`` or ``"prv"``: the one that reports
            epsilon *and* checks the budget.
        secure_mode: Opacus' secure mode (CSPRNG noise, Mironov 2012's floating-point
            attack mitigated by Opacus' two-sample noise; needs ``torchcsprng``).
        max_epsilon: record-level budget at ``delta`` (``inf`` = no limit): a round
            that would take the ledger past it is refused before any data is touched
            (:class:`~flwr_guard.dp.budget.PrivacyBudgetExceeded`).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    grad_sample_mode: GradSampleMode = "hooks"
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_mode: bool = False
    max_epsilon: float = math.inf

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max grad norm must be finite and > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost', got {self.grad_sample_mode!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if not self.max_epsilon > 0:
            raise ValueError(f"max epsilon must be > 0 (inf = no limit), got {self.max_epsilon}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *,
                        node_config: Mapping[str, Any] | None = None) -> DPSGDConfig:
        """Read ``dp-sgd-noise-multiplier``, ``dp-sgd-max-grad-norm`` (required) and
        ``dp-sgd-delta``, ``dp-sgd-ghost-clipping`` (bool), ``dp-sgd-accountant``,
        ``dp-sgd-secure-mode`` (bool), ``dp-sgd-max-epsilon`` (0 = no limit) from a
        Flower run config (:class:`flwr_guard.keys.RunConfig`).

        The run config is the server's: the result is always bounded by the node's
        policy (:meth:`bounded_by` ``node_config``; an empty or absent node config gets
        the library defaults: budget cap 10, noise floor 0.5).

        Raises:
            KeyError: naming the missing required key.
            ValueError: for invalid values, or a noise multiplier below the node's floor.
        """
        required = (RunConfig.DP_SGD_NOISE_MULTIPLIER, RunConfig.DP_SGD_MAX_GRAD_NORM)
        missing = [k for k in required if k not in run_config]
        if missing:
            raise KeyError(
                f"DP-SGD needs {', '.join(missing)} in the run config "
                "([tool.flwr.app.config] or `flwr run --run-config`)"
            )
        max_epsilon = float(run_config.get(RunConfig.DP_SGD_MAX_EPSILON, 0.0)) or math.inf
        ghost = bool(run_config.get(RunConfig.DP_SGD_GHOST_CLIPPING, False))
        config = cls(
            noise_multiplier=float(run_config[RunConfig.DP_SGD_NOISE_MULTIPLIER]),
            max_grad_norm=float(run_config[RunConfig.DP_SGD_MAX_GRAD_NORM]),
            delta=float(run_config.get(RunConfig.DP_SGD_DELTA, 1e-5)),
            grad_sample_mode="ghost" if ghost else "hooks",
            accountant=choice(run_config.get(RunConfig.DP_SGD_ACCOUNTANT, "rdp"), ("rdp", "prv"),
                              RunConfig.DP_SGD_ACCOUNTANT),
            secure_mode=bool(run_config.get(RunConfig.DP_SGD_SECURE_MODE, False)),
            max_epsilon=max_epsilon,
        )
        return config.bounded_by(node_config or {}, "the run config")

    def bounded_by(self, node_config: Mapping[str, Any], who: str = "the app") -> DPSGDConfig:
        """This config under the node operator's policy (node config, library defaults
        for what it does not set; :mod:`flwr_guard.dp.node_policy`).

        ``max_epsilon`` is capped by ``dp-sgd-max-epsilon`` (default 10: never
        unbounded), ``secure_mode`` is forced on by ``dp-sgd-secure-mode``, and a noise
        multiplier below ``dp-sgd-min-noise-multiplier`` (default 0.5), 0 included, is
        refused. A config may be stricter than the node, never looser.

        Raises:
            ValueError: naming the node-config key of the floor that refused it.
        """
        floor = dpsgd_min_noise_multiplier(node_config)
        if not self.noise_multiplier >= floor:
            raise ValueError(
                f"{who} asks for DP-SGD noise multiplier {self.noise_multiplier:g}, below this "
                f"node's floor {NodeConfig.DP_SGD_MIN_NOISE_MULTIPLIER}={floor:g} (node config; "
                "library default 0.5): refusing to train"
            )
        return replace(
            self,
            max_epsilon=min(self.max_epsilon, dpsgd_max_epsilon(node_config)),
            secure_mode=self.secure_mode or flag(node_config.get(NodeConfig.DP_SGD_SECURE_MODE, False)),
        )


def opacus_epsilon(history: Sequence[tuple[float, float, int]], delta: float,
                       accountant: str = "rdp") -> float:
    """Epsilon of an Opacus history ``[(noise_multiplier, sample_rate, steps), ...]``.

    Computed by a fresh Opacus accountant of kind ``accountant`` (``"rdp"`` or
    ``"prv"``): the same arithmetic as the accountant attached to training.
    0.0 for an empty history; ``inf`` if a step has no noise.

    Raises:
        ValueError: an entry that is not finite and in bounds (``0 <= z <=``
            :data:`~flwr_guard.dp.record_ledger.MAX_NOISE_MULTIPLIER`, ``0 <= q <= 1``,
            integer ``0 <= steps <=`` :data:`~flwr_guard.dp.record_ledger.MAX_STEPS`):
            Opacus' accountant never returns on a NaN or infinite multiplier.
    """
    checked = []
    for z, q, n in history:
        try:
            noiseless, unsampled = float(z) == 0, float(q) == 0
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid ledger entry {(z, q, n)!r}: {err}") from None
        if unsampled:
            continue  # never sampled: costs nothing
        # a noiseless step is checked with any valid multiplier, then costs inf
        cz, cq, cn = check_entry((MAX_NOISE_MULTIPLIER if noiseless else z, q, n))
        checked.append((0.0 if noiseless else cz, cq, cn))
    history = [(z, q, n) for z, q, n in checked if n > 0]
    if not history:
        return 0.0
    if any(z == 0 for z, _, _ in history):
        return math.inf
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


class PrivateTraining(NamedTuple):
    """What :meth:`DPSGD.make_private` returns; use these four, not the originals.

    ``module`` is Opacus' wrapper (``GradSampleModule``); the original model object is
    trained in place, so ``model.state_dict()`` of the original has the usual keys.
    ``criterion`` is the original loss (``"hooks"``) or Opacus' two-pass wrapper
    (``"ghost"``); call ``criterion(output, target).backward()`` either way.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Any
    data_loader: DataLoader


def check_module(model: nn.Module) -> None:
    """Raise :class:`DPSGDModelError` if Opacus cannot train ``model`` privately.

    The message lists Opacus' findings (``ModuleValidator.validate``) and the fix:
    ``model = ModuleValidator.fix(model)`` replaces BatchNorm by GroupNorm (and similar)
    — on the server too, so that client and server models keep the same parameters.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        found = "; ".join(sorted({str(e).split(".")[0] for e in errors}))
        raise DPSGDModelError(
            f"Opacus cannot compute per-example gradients for this model: {found}. "
            "Fix: `from opacus.validators import ModuleValidator; model = "
            "ModuleValidator.fix(model)` (replaces BatchNorm with GroupNorm) and build the "
            "same fixed model on the server, or use GroupNorm/LayerNorm in the model itself."
        )


class DPSGD:
    """One client's DP-SGD: an Opacus ``PrivacyEngine`` with a ledger and a budget.

    The ledger is the Opacus history ``[(noise_multiplier, sample_rate, steps), ...]``
    of every round this node trained on its data source: from ``ledger`` (the durable
    :class:`~flwr_guard.dp.record_ledger.RecordLedger` of the source) when given, else
    from ``accountant_state``.
    :meth:`make_private` projects the round (``epochs * len(loader)`` steps at sample
    rate ``1 / len(loader)``) onto it with the configured accountant, refuses the round
    if epsilon would exceed ``config.max_epsilon``, and otherwise *reserves* those steps
    in the ledger before training: empty Poisson batches and crashed rounds are counted.

    Args:
        config: :class:`DPSGDConfig`.
        accountant_state: an earlier ``{"history": [...], "mechanism": ...}`` (the node's
            memory, ``context.state``), or ``None``. With ``ledger`` it is the evidence
            the durable ledger is checked against.
        noise_generator: optional ``torch.Generator`` for the noise (tests only; never
            with ``secure_mode``).
        ledger: the node's ``RecordLedger`` of this data source.
        epochs: local epochs of the round (needed for the budget check; may also be
            passed to :meth:`make_private`).

    Raises:
        ValueError: ``secure_mode`` without ``torchcsprng`` (message names the fix).
    """

    def __init__(
        self,
        config: DPSGDConfig,
        accountant_state: Mapping[str, Any] | None = None,
        noise_generator: torch.Generator | None = None,
        *,
        ledger: RecordLedger | None = None,
        epochs: int | None = None,
    ) -> None:
        self.config = config
        try:
            self.engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        except ImportError as err:
            raise ValueError(
                "dp-sgd-secure-mode needs torchcsprng (Opacus' CSPRNG): install it "
                "(https://github.com/pytorch/csprng) or turn secure mode off"
            ) from err
        self._memory: list[tuple[float, float, int]] = [
            (float(z), float(q), int(n)) for z, q, n in (accountant_state or {}).get("history", [])
        ]
        self._ledger: RecordLedger | None = ledger
        self.epochs = epochs
        self._noise_generator = noise_generator
        self._private: PrivateTraining | None = None
        self._reserved = 0

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ledger: every step this node has spent on its data (reserved included,
        and steps run beyond the reservation that :meth:`finish` has yet to record)."""
        history = list(self._ledger.history if self._ledger is not None else self._memory)
        extra = self.realised_steps - self._reserved if self._private is not None else 0
        if extra > 0:
            append_steps(history, (self.config.noise_multiplier, self._sample_rate, extra))
        return history

    def projected_epsilon(self, sample_rate: float, steps: int) -> float:
        """Epsilon at ``config.delta`` if ``steps`` more steps at ``sample_rate`` ran."""
        return opacus_epsilon(
            [*self.history, (self.config.noise_multiplier, sample_rate, steps)],
            self.config.delta, self.config.accountant,
        )

    def make_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        criterion: Any = None,
        epochs: int | None = None,
    ) -> PrivateTraining:
        """Check the budget, reserve the round's steps, and wrap model, optimizer, loss
        and loader for DP-SGD with Poisson sampling.

        Move ``model`` to its device *before* building ``optimizer``. The expected batch
        size is the loader's ``batch_size``; the sample rate is ``1 / len(data_loader)``
        and a round is ``epochs * len(data_loader)`` steps (run exactly that many
        epochs over ``PrivateTraining.data_loader``; more are added by :meth:`finish`).

        Raises:
            PrivacyBudgetExceeded: the round would take epsilon past ``max_epsilon``
                (nothing is reserved, the data is not touched).
            ValueError: a finite budget without ``epochs``.
            DPSGDModelError: for layers Opacus cannot handle (see :func:`check_module`).
            RuntimeError: if called twice on the same :class:`DPSGD` (one per round).
        """
        if self._private is not None:
            raise RuntimeError("make_private was already called on this DPSGD; create one per round")
        check_module(model)
        epochs = epochs if epochs is not None else self.epochs
        steps_per_epoch = len(data_loader)
        if steps_per_epoch < 1:
            raise ValueError("DP-SGD needs a non-empty data loader")
        sample_rate = 1.0 / steps_per_epoch
        if epochs is None:
            if math.isfinite(self.config.max_epsilon):
                raise ValueError(
                    "a DP-SGD budget (max_epsilon) needs the round's epochs before training: "
                    "pass epochs= to DPSGD / dpsgd_from_context or make_private"
                )
        else:
            if epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {epochs}")
            steps = epochs * steps_per_epoch
            after = self.projected_epsilon(sample_rate, steps)
            if after > self.config.max_epsilon:
                spent = opacus_epsilon(self.history, self.config.delta, self.config.accountant)
                raise PrivacyBudgetExceeded(
                    f"record-level privacy budget exhausted: this round ({steps} DP-SGD steps "
                    f"at sample rate {sample_rate:.4g}) would bring epsilon from {spent:.4g} "
                    f"to {after:.4g} > max epsilon {self.config.max_epsilon:g} at delta "
                    f"{self.config.delta:g} ({self.config.accountant} accountant); this node "
                    "does not train on its data any more"
                )
            self._reserve(sample_rate, steps)
        out = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            noise_multiplier=self.config.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=self.config.grad_sample_mode,
            noise_generator=self._noise_generator,
        )
        if self.config.grad_sample_mode == "ghost":
            module, opt, crit, loader = out
        else:
            module, opt, loader = out
            crit = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._private = PrivateTraining(module, opt, crit, loader)
        self._sample_rate = sample_rate
        return self._private

    def _reserve(self, sample_rate: float, steps: int) -> None:
        entry = (self.config.noise_multiplier, sample_rate, steps)
        if self._ledger is not None:
            self._ledger.reserve(*entry, delta=self.config.delta, accountant=self.config.accountant)
        else:
            append_steps(self._memory, entry)
        self._reserved += steps

    @property
    def realised_steps(self) -> int:
        """Optimiser steps Opacus counted in this round (empty batches skipped by the
        training loop are not among them, but were reserved)."""
        return sum(int(steps) for _, _, steps in self.engine.accountant.history)

    def finish(self) -> float:
        """After training: add steps run beyond the reservation; return epsilon."""
        extra = self.realised_steps - self._reserved
        if self._private is not None and extra > 0:
            logger.warning("DP-SGD ran %d steps more than reserved: added to the ledger", extra)
            self._reserve(self._sample_rate, extra)
        return self.epsilon()

    @property
    def steps(self) -> int:
        """Noised optimiser steps in the ledger, all rounds together."""
        return sum(int(steps) for _, _, steps in self.history)

    def epsilon(self, delta: float | None = None) -> float:
        """Record-level epsilon spent so far at ``delta`` (the config's by default),
        by the configured accountant."""
        return opacus_epsilon(self.history, delta or self.config.delta, self.config.accountant)

    def accountant_state(self) -> dict[str, Any]:
        """``{"history": ledger, "mechanism": accountant}``: the node's in-memory copy."""
        return {"history": self.history, "mechanism": self.config.accountant}
