"""Record-level DP-SGD for the user's training code, over Opacus (no Flower imports).

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1):
Poisson-sampled batches, every example's gradient clipped to ``max_grad_norm``,
Gaussian noise of std ``noise_multiplier * max_grad_norm`` added to the sum. Opacus
(``opacus.PrivacyEngine.make_private``) does all three; this module adds what a
federated client needs around it:

- the accountant's ledger survives the client process: :class:`DPSGD` starts from a
  saved ``accountant.state_dict()`` (kept in ``context.state`` by
  :mod:`flwr_guard.dp.context_state`) instead of a fresh accountant that would forget
  the rounds already trained — record-level epsilon composes over every round the
  client took part in;
- a model Opacus cannot handle (BatchNorm, ...) fails with :class:`DPSGDModelError`
  naming the fix (``opacus.validators.ModuleValidator.fix``);
- ghost clipping (Bu et al. 2022 / Opacus ``grad_sample_mode="ghost"``): per-example
  gradient norms without materialising per-example gradients;
- the parameters come from the run config (:meth:`DPSGDConfig.from_run_config`).

Typical use inside a ClientApp's ``train`` (one :class:`DPSGD` per training call; in a
deployment each message runs in a fresh process, so that is once per process)::

    dpsgd = dpsgd_from_context(context)                    # context_state adapter
    device = resolve_device(context.node_config.get("device"))
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    private = dpsgd.make_private(model, optimizer, trainloader)
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        loss = private.criterion(private.module(x.to(device)), y.to(device))
        loss.backward()
        private.optimizer.step()
    save_dpsgd(context, dpsgd)                             # ledger back to context.state
    metrics["dp-sgd-epsilon"] = dpsgd.epsilon()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

GradSampleMode = Literal["hooks", "ghost"]
RUN_CONFIG_PREFIX = "dp-sgd-"


class DPSGDModelError(ValueError):
    """The model has layers Opacus cannot compute per-example gradients for."""


@dataclass(frozen=True)
class DPSGDConfig:
    """Parameters of DP-SGD.

    Attributes:
        noise_multiplier: ``sigma`` (noise std / ``max_grad_norm``), ``>= 0``.
        max_grad_norm: per-example L2 clipping norm ``C > 0``.
        delta: delta at which epsilon is reported (``1e-5`` by default; choose
            ``< 1 / examples per client``).
        grad_sample_mode: ``"hooks"`` (per-example gradients) or ``"ghost"`` (ghost
            clipping: per-example norms only, less memory).
        accountant: Opacus accountant, ``"rdp"`` or ``"prv"``.
        secure_mode: Opacus' secure mode (CSPRNG noise; needs ``torchcsprng``).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    grad_sample_mode: GradSampleMode = "hooks"
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max grad norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost', got {self.grad_sample_mode!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], prefix: str = RUN_CONFIG_PREFIX
                        ) -> DPSGDConfig:
        """Read ``{prefix}noise-multiplier``, ``{prefix}max-grad-norm`` (required) and
        ``{prefix}delta``, ``{prefix}ghost-clipping`` (bool), ``{prefix}accountant``
        (optional) from a Flower run config.

        Raises:
            KeyError: naming the missing required key.
            ValueError: for invalid values.
        """
        missing = [k for k in ("noise-multiplier", "max-grad-norm") if prefix + k not in run_config]
        if missing:
            raise KeyError(
                f"DP-SGD needs {', '.join(prefix + k for k in missing)} in the run config "
                "([tool.flwr.app.config] or `flwr run --run-config`)"
            )
        return cls(
            noise_multiplier=float(run_config[prefix + "noise-multiplier"]),
            max_grad_norm=float(run_config[prefix + "max-grad-norm"]),
            delta=float(run_config.get(prefix + "delta", 1e-5)),
            grad_sample_mode="ghost" if bool(run_config.get(prefix + "ghost-clipping", False)) else "hooks",
            accountant=str(run_config.get(prefix + "accountant", "rdp")),  # type: ignore[arg-type]
        )


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


def resolve_device(requested: str | None = None) -> torch.device:
    """Device for training: ``"auto"``/``None`` = CUDA when available, else CPU.

    ``"cuda"`` (or ``"cuda:N"``) on a node without CUDA falls back to CPU with a
    warning; ``"cpu"`` is always CPU.

    Raises:
        ValueError: for a device string torch does not understand.
    """
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(requested))
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("DP-SGD: device %r requested, CUDA unavailable: training on CPU", requested)
        return torch.device("cpu")
    return device


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
    """One client's DP-SGD: an Opacus ``PrivacyEngine`` whose accountant remembers.

    Args:
        config: :class:`DPSGDConfig`.
        accountant_state: an earlier ``accountant.state_dict()`` (``{"history":
            [(noise_multiplier, sample_rate, steps), ...], "mechanism": "rdp"}``), or
            ``None`` for the very first round of this client.
        noise_generator: optional ``torch.Generator`` for the noise (tests only; never
            with ``secure_mode``).

    Raises:
        ValueError: if ``accountant_state`` was written by another accountant kind.
    """

    def __init__(
        self,
        config: DPSGDConfig,
        accountant_state: Mapping[str, Any] | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        self.config = config
        self.engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        if accountant_state:
            self.engine.accountant.load_state_dict(dict(accountant_state))
        self._noise_generator = noise_generator
        self._private: PrivateTraining | None = None

    def make_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        criterion: Any = None,
    ) -> PrivateTraining:
        """Wrap model, optimizer, loss and loader for DP-SGD with Poisson sampling.

        Move ``model`` to its device *before* building ``optimizer``. The expected batch
        size is the loader's ``batch_size``; the sample rate is ``1 / len(data_loader)``.

        Raises:
            DPSGDModelError: for layers Opacus cannot handle (see :func:`check_module`).
            RuntimeError: if called twice on the same :class:`DPSGD` (one per round).
        """
        if self._private is not None:
            raise RuntimeError("make_private was already called on this DPSGD; create one per round")
        check_module(model)
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
        return self._private

    @property
    def steps(self) -> int:
        """Noised optimiser steps in the ledger, all rounds together."""
        return sum(int(steps) for _, _, steps in self.engine.accountant.history)

    def epsilon(self, delta: float | None = None) -> float:
        """Record-level epsilon spent so far at ``delta`` (the config's by default)."""
        if len(self.engine.accountant) == 0:
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta or self.config.delta))

    def accountant_state(self) -> dict[str, Any]:
        """``accountant.state_dict()``: keep it and pass it to the next round's DPSGD."""
        return dict(self.engine.accountant.state_dict())
