"""Flower adapter: ``DPFedAvg``, central or distributed noise and a budget around any strategy.

User-level DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et al.
2021), as a :class:`~flwr_guard.strategy_wrapper.StrategyWrapper`::

    strategy = SecAggPlus(
        DPFedAvg(FedAvg(...), noise_multiplier=1.0, clipping_norm=0.5,
                 expected_contributors=30, max_epsilon=8.0, delta=1e-5),
        masked_metrics=DPFedAvg.MASKED_METRICS)

Clients clip with :func:`~flwr_guard.dp.mods.update_clipping_mod`. Each round:

1. ``configure_train`` sends the clipping norm ``C_t`` (and, in distributed mode, ``z``,
   ``m`` and the quantisation step) in the train config, lets the wrapped strategy
   sample the cohort, and asks the budget whether this round fits ``max_epsilon``. If
   it does not, it sends nothing, logs why, and every later round is skipped.
2. ``aggregate_train`` sums the clipped updates, checks that every contributor proved
   its clipping (and, distributed, its noise) by the masked counts, adds ``N(0, (z
   C_t)^2)`` to the *sum* (central; nothing in distributed mode), divides by the fixed
   ``expected_contributors`` and hands the wrapped strategy replies that all carry
   ``global + noised mean``, so FedAvg, FedAdam, FedProx... only post-process it. Then
   it spends the round on the budget (checkpointed) and, under adaptive clipping, moves
   ``C`` with the noised sum of centred bits.

Accounting: no sampling amplification by default (Flower samples a fixed-size cohort;
in distributed mode the server, the adversary, picks it); Skellam noise with its own RDP
(:mod:`flwr_guard.dp.skellam_accounting`).

What this fixes relative to Flower's DP wrappers: the adaptive ones noise with the
*updated* clipping norm (the noise must match the norm the clients clipped to); all of
them noise ``z C / n`` but let FedAvg average with example weights, whose sensitivity is
``C * w_max / sum w``, not ``C / n``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import (
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.serverapp.strategy import Strategy

from flwr_guard.config_values import choice, number
from flwr_guard.dp.accounting import NEIGHBOURING, AccountantKind, Sampling
from flwr_guard.dp.budget import PrivacyBudget
from flwr_guard.dp.central import (
    add_gaussian_noise,
    add_skellam_noise_to_sum,
    central_noise_std,
    central_skellam_parameters,
)
from flwr_guard.dp.clipping import clip_update, split_noise_multiplier, update_clipping_norm
from flwr_guard.dp.distributed import quantised_l2_bound, skellam_mu
from flwr_guard.dp.record_ledger import default_ledger_dir
from flwr_guard.dp.skellam_accounting import quantised_l1_bound
from flwr_guard.errors import FlwrGuardError
from flwr_guard.keys import ReplyMetrics, RunConfig, ServerMetrics, TrainConfig
from flwr_guard.strategy_wrapper import StrategyWrapper

DP_METRIC_KEYS = (ReplyMetrics.DP_UNCLIPPED_COUNT, ReplyMetrics.DP_CLIPPED_COUNT, ReplyMetrics.DP_NOISED_COUNT)
# The metrics SecAgg+ must sum masked for DPFedAvg:
# SecAggPlus(DPFedAvg(...), masked_metrics=DPFedAvg.MASKED_METRICS).
MASKED_METRICS = (ReplyMetrics.DP_CLIPPED_COUNT, ReplyMetrics.DP_NOISED_COUNT, ReplyMetrics.DP_UNCLIPPED_COUNT)
AUTO = "auto"
Relation = Literal["add-remove", "zero-out"]
RELATIONS: tuple[Relation, ...] = get_args(Relation)
#: What each relation means, named next to every epsilon DPFedAvg prints.
RELATION_NAMES = {
    "add-remove": "add/remove one client",
    "zero-out": "zero-out one client (its noise share stays)",
}


def _scope_part(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", value.strip()).strip("._") or "default"
    return cleaned[:100]


def default_checkpoint(federation: str = "", app: str = "") -> Path:
    """``$FLWR_HOME/flwr-guard/dpfedavg/<federation>/<app>/privacy.json`` (``~/.flwr``
    without FLWR_HOME): one user-level ledger per federation and app (the FAB id,
    ``publisher/name``), so two apps in one Flower home never share a budget; empty
    parts are ``default``."""
    return (default_ledger_dir().parent / "dpfedavg" / _scope_part(federation)
            / _scope_part(app.replace("/", "__")) / "privacy.json")


def run_scope(grid: Grid) -> tuple[str, str]:
    """``(federation, app)`` of the grid's run (``("", "")`` where the grid has none)."""
    try:
        run = grid.run
        return str(run.federation_id or ""), str(run.fab_id or "")
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):  # no run info
        return "", ""


class DPConfigurationError(FlwrGuardError, RuntimeError):
    """A protection DPFedAvg was configured with is not in force (message names the fix)."""


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021 adaptive clipping (central noise only).

    Attributes:
        target_quantile: ``gamma``, the fraction of updates to leave unclipped.
        learning_rate: ``eta_C`` of the geometric update (0.2 in the paper).
        count_stddev: ``sigma_b``, noise std of the sum of centred bits ``b - 1/2``;
            ``None`` = the paper's ``expected clients / 20``. Must exceed
            ``noise_multiplier / 2``.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None


@dataclass
class _Round:
    number: int
    global_arrays: ArrayRecord
    clipping_norm: float
    sample_rate: float
    population: int | None


class DPFedAvg(StrategyWrapper):
    """Central or distributed user-level DP with a budget, around any strategy.

    Args:
        strategy: the wrapped strategy (FedAvg, FedAdam, ... or flwr-guard wrappers).
        noise_multiplier: ``z``, noise std on the sum of clipped updates / ``C``; the
            value the round is accounted with (under adaptive clipping the updates get
            ``z_delta`` of :func:`~flwr_guard.dp.clipping.split_noise_multiplier`).
        clipping_norm: ``C`` (the initial one under adaptive clipping), L2, model units.
        expected_contributors: ``n``, the fixed denominator of the mean (the expected
            cohort size): the noised *sum* is divided by it, never by the realised count
            (a count without noise is not public under add/remove-one; TFF's and Opacus'
            DP means divide by a fixed expected size too). A round with fewer
            contributors keeps the noise ``z C`` on the sum (the guarantee holds for any
            count) and its mean is scaled down accordingly.
        adaptive: :class:`AdaptiveClipping`, or ``None`` for fixed. Refused with
            ``distributed`` (the server would hold the exact sum of the bits).
        max_epsilon: the budget at ``delta`` (``inf`` = account, never stop).
        delta: target delta (choose ``< 1 / population``).
        sampling: ``"none"`` (default: no amplification; Flower samples a fixed-size
            cohort with ``random.sample`` and, in distributed mode, the possibly
            malicious server picks it), ``"poisson"`` (needs ``sample_rate``: only for a
            Poisson sampler the adversary does not control), or ``"fixed-size"`` (needs
            ``sample_rate`` and ``population``; replace-one, see
            :mod:`flwr_guard.dp.accounting`). Distributed mode accepts ``"none"`` only.
        sample_rate, population: ``q`` and ``N`` for ``"poisson"`` / ``"fixed-size"``.
        accountant: ``"rdp"`` or ``"pld"`` (central Gaussian only; Skellam is RDP).
        checkpoint: JSON file of the privacy ledger (and adaptive ``C``), loaded if
            present so a restarted ServerApp continues from the epsilon spent;
            ``"auto"`` (default) = :func:`default_checkpoint` of the run's federation
            and app (bound at the first round, :meth:`bind_checkpoint`; the path is
            logged), falling back to memory with one warning where it cannot be
            written; ``None`` = memory only.
        distributed: the clients add Skellam noise through SecAgg+
            (:mod:`flwr_guard.dp.distributed`): this wrapper adds none, sends
            ``dp-noise-multiplier``, ``dp-min-contributors`` and
            ``dp-quantization-step`` in the train config, checks that every contributor
            clipped and noised (masked counts, :data:`MASKED_METRICS`) and accounts the
            round with Skellam's RDP for the survivors' noise.
        min_contributors: with ``distributed``, ``m``: each client's noise is scaled so
            that ``m`` clients' noise sum to ``z`` (clients may refuse an ``m`` above
            their own assumption).
        quantization_step: with ``distributed``, SecAgg+'s step ``2 r / L``
            (``clipping_range``, ``quantization_range``): the Skellam sensitivity is
            ``C / step + sqrt(d)``; clients refuse a step that differs from theirs.
        relation: with ``distributed``, the neighbouring relation epsilon is accounted
            under: ``"add-remove"`` (default; Flower's ``ADD_OR_REMOVE_ONE``: the removed
            client takes its noise share with it;
            :mod:`flwr_guard.dp.relation_accounting`, which grows with the model's
            dimension) or ``"zero-out"`` (the client stays with a zero update and its
            noise; Kairouz et al. 2021): every epsilon DPFedAvg logs names it.
        rng: NumPy generator for the noise; ``None`` = seeded from the OS. Never pass a
            fixed seed in production. Central noise is float64 Gaussian: see
            docs/privacy.md on the floating-point caveat (Mironov 2012).

    Raises:
        ValueError: for invalid or contradictory parameters (also from the budget and
            the checkpoint).
    """

    MASKED_METRICS = MASKED_METRICS

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        *,
        expected_contributors: int | None = None,
        adaptive: AdaptiveClipping | None = None,
        max_epsilon: float = math.inf,
        delta: float = 1e-5,
        sample_rate: float | None = None,
        population: int | None = None,
        accountant: AccountantKind = "rdp",
        sampling: Sampling = "none",
        checkpoint: str | os.PathLike[str] | None = AUTO,
        distributed: bool = False,
        min_contributors: int | None = None,
        quantization_step: float | None = None,
        relation: Relation = "add-remove",
        secure_noise: bool = False,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(strategy)
        if expected_contributors is None or int(expected_contributors) < 1:
            raise ValueError(
                "DPFedAvg needs expected_contributors >= 1 (run config "
                "dp-expected-contributors): the fixed denominator of the mean, z C / n; "
                "use the expected cohort size"
            )
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise multiplier must be finite and > 0, got {noise_multiplier}")
        if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            raise ValueError(f"clipping norm must be finite and > 0, got {clipping_norm}")
        if sampling == "none":
            sample_rate, population = 1.0, None
        elif sampling == "poisson" and sample_rate is None:
            raise ValueError(
                "sampling='poisson' needs an explicit sample_rate: Flower's FedAvg samples a "
                "fixed-size cohort (random.sample), so no realised rate is a Poisson rate; "
                "use sampling='none' unless a trusted Poisson sampler picks the cohort"
            )
        elif sampling == "fixed-size" and (sample_rate is None or population is None):
            raise ValueError("sampling='fixed-size' needs sample_rate (m / N) and population N")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        if distributed:
            if min_contributors is None or min_contributors < 1:
                raise ValueError("distributed DP needs min_contributors >= 1: the number of "
                                 "clients whose noise the sum is guaranteed to hold")
            if sampling != "none":
                raise ValueError(
                    f"distributed DP is accounted without sampling amplification: the server "
                    f"picks the cohort and is the adversary; use sampling='none', not {sampling!r}"
                )
            if adaptive is not None:
                raise ValueError(
                    "adaptive clipping with distributed noise is refused: the server would "
                    "hold the exact sum of the clients' unclipped bits; use a fixed clipping "
                    "norm (or central noise)"
                )
            if accountant != "rdp":
                raise ValueError("distributed (Skellam) noise is accounted with its own RDP: "
                                 "use accountant='rdp'")
            if not (quantization_step is not None and quantization_step > 0):
                raise ValueError(
                    "distributed DP needs quantization_step = 2 * clipping_range / "
                    "quantization_range of SecAggPlus (run config dp-quantization-step): the "
                    "Skellam sensitivity C / step + sqrt(d) depends on it"
                )
        if secure_noise and (distributed or adaptive is not None or accountant != "rdp"
                             or sampling == "fixed-size"):
            raise ValueError(
                "secure_noise (integer Skellam noise on the server) is for central DP with "
                "fixed clipping, accountant='rdp' and sampling 'none' or 'poisson' "
                "(distributed noise is integer already)"
            )
        if relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
        if relation == "zero-out" and not distributed:
            raise ValueError("relation='zero-out' is for distributed DP (the server's central "
                             "noise does not leave with a client): use 'add-remove'")
        self.relation: Relation = relation
        self.secure_noise = bool(secure_noise)
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.expected_contributors = int(expected_contributors)
        self.adaptive = adaptive
        self.sampling: Sampling = sampling
        self.sample_rate = float(sample_rate) if sample_rate is not None else 1.0
        self.population = population
        # "auto": the path depends on the run's federation and app, known from the grid
        # at the first configure_train (bind_checkpoint); memory until then.
        self._auto_checkpoint = checkpoint is not None and str(checkpoint) == AUTO
        self.budget = PrivacyBudget(max_epsilon, delta, accountant, sampling,
                                    None if self._auto_checkpoint else self._checkpoint_path(checkpoint))
        if self.budget.checkpoint is not None:
            log(INFO, "DPFedAvg: user-level privacy ledger %s", self.budget.checkpoint)
        self._restore_clipping_norm()
        self.weight_key: str | None = getattr(strategy, "weighted_by_key", None)
        self.distributed = distributed
        self.min_contributors = min_contributors
        self.quantization_step = quantization_step
        self.rng = rng if rng is not None else np.random.default_rng()
        self.stopped_reason: str | None = None
        self._round: _Round | None = None

    def _restore_clipping_norm(self) -> None:
        if "clipping-norm" in self.budget.extra:  # restarted: continue the adapted norm
            self.clipping_norm = float(self.budget.extra["clipping-norm"])

    def bind_checkpoint(self, grid: Grid) -> Path | None:
        """With ``checkpoint="auto"``: load the ledger of this run's federation and app
        (:func:`default_checkpoint`) and keep writing there; logs the path. Called by
        the first :meth:`configure_train`; idempotent. Returns the path (``None`` for
        memory only).

        Raises:
            CheckpointMismatch: the scoped ledger was written with another delta,
                accountant or sampling.
        """
        if not self._auto_checkpoint:
            return self.budget.checkpoint
        self._auto_checkpoint = False
        federation, app = run_scope(grid)
        path = self._checkpoint_path(AUTO, federation, app)
        if path is None:
            return None
        spent = list(self.budget.ledger.steps)
        self.budget = PrivacyBudget(self.budget.max_epsilon, self.budget.delta,
                                    self.budget.accountant, self.budget.sampling, path)
        for step in spent:  # steps recorded before binding (none in a normal run)
            self.budget.ledger.add(step.noise_multiplier, step.sample_rate, step.count,
                                   step.population, step.skellam, step.leaving_shares)
        self.budget.save()
        self._restore_clipping_norm()
        log(INFO, "DPFedAvg: user-level privacy ledger %s (federation %r, app %r): epsilon "
            "%.4g spent of %.4g", path, federation or "default", app or "default",
            self.budget.epsilon_spent, self.budget.max_epsilon)
        return path

    @staticmethod
    def _checkpoint_path(checkpoint: str | os.PathLike[str] | None, federation: str = "",
                         app: str = "") -> Path | None:
        if checkpoint is None:
            return None
        if str(checkpoint) != AUTO:
            return Path(checkpoint)
        path = default_checkpoint(federation, app)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise PermissionError(f"{path.parent} is not writable")
        except OSError as err:
            log(WARNING, "DPFedAvg: cannot write the privacy checkpoint %s (%s): the ledger "
                "is kept in memory only and a ServerApp restart would reset epsilon; pass "
                "checkpoint= (run config dp-checkpoint) with a writable path", path, err)
            return None
        return path

    @classmethod
    def from_run_config(cls, strategy: Strategy, run_config: Mapping[str, Any],
                        **kwargs: Any) -> DPFedAvg:
        """Build from ``dp-*`` run-config keys (see docs/privacy.md for the table).

        Required: ``dp-noise-multiplier``, ``dp-clipping-norm``,
        ``dp-expected-contributors``. Optional: ``dp-max-epsilon`` (0 = no limit),
        ``dp-delta``, ``dp-sampling`` (``none``), ``dp-sample-rate``,
        ``dp-population``, ``dp-accountant``, ``dp-checkpoint`` ("" = the default path,
        "none" = memory only), ``dp-adaptive-clipping`` (bool), ``dp-target-quantile``,
        ``dp-clip-learning-rate``, ``dp-clipped-count-stddev`` (0 = expected / 20),
        ``dp-secure-noise`` (bool), ``dp-distributed`` (bool), ``dp-relation``
        (``add-remove`` or ``zero-out``), ``dp-min-contributors``,
        ``dp-quantization-step``
        (0 = ``2 * secagg-clipping-range / secagg-quantization-range`` when the run
        config has them).
        """
        get = run_config.get
        missing = [k for k in (RunConfig.DP_NOISE_MULTIPLIER, RunConfig.DP_CLIPPING_NORM,
                               RunConfig.DP_EXPECTED_CONTRIBUTORS) if k not in run_config]
        if missing:
            raise KeyError(f"DPFedAvg needs {', '.join(missing)} in the run config")
        adaptive = None
        if bool(get(RunConfig.DP_ADAPTIVE_CLIPPING, False)):
            adaptive = AdaptiveClipping(
                float(get(RunConfig.DP_TARGET_QUANTILE, 0.5)),
                float(get(RunConfig.DP_CLIP_LEARNING_RATE, 0.2)),
                float(get(RunConfig.DP_CLIPPED_COUNT_STDDEV, 0.0)) or None,
            )
        step = float(get(RunConfig.DP_QUANTIZATION_STEP, 0.0)) or None
        if step is None and {RunConfig.SECAGG_CLIPPING_RANGE,
                             RunConfig.SECAGG_QUANTIZATION_RANGE} <= set(run_config):
            step = 2 * float(run_config[RunConfig.SECAGG_CLIPPING_RANGE]) / float(
                run_config[RunConfig.SECAGG_QUANTIZATION_RANGE])
        checkpoint = str(get(RunConfig.DP_CHECKPOINT, ""))
        return cls(
            strategy,
            noise_multiplier=float(run_config[RunConfig.DP_NOISE_MULTIPLIER]),
            clipping_norm=float(run_config[RunConfig.DP_CLIPPING_NORM]),
            expected_contributors=int(run_config[RunConfig.DP_EXPECTED_CONTRIBUTORS]),
            adaptive=adaptive,
            max_epsilon=float(get(RunConfig.DP_MAX_EPSILON, 0.0)) or math.inf,
            delta=float(get(RunConfig.DP_DELTA, 1e-5)),
            sample_rate=float(get(RunConfig.DP_SAMPLE_RATE, 0.0)) or None,
            population=int(get(RunConfig.DP_POPULATION, 0)) or None,
            accountant=choice(get(RunConfig.DP_ACCOUNTANT, "rdp"), get_args(AccountantKind),
                              RunConfig.DP_ACCOUNTANT),
            sampling=choice(get(RunConfig.DP_SAMPLING, "none"), get_args(Sampling), RunConfig.DP_SAMPLING),
            checkpoint=None if checkpoint == "none" else (checkpoint or AUTO),
            distributed=bool(get(RunConfig.DP_DISTRIBUTED, False)),
            min_contributors=int(get(RunConfig.DP_MIN_CONTRIBUTORS, 0)) or None,
            quantization_step=step,
            secure_noise=bool(get(RunConfig.DP_SECURE_NOISE, False)),
            relation=choice(get(RunConfig.DP_RELATION, "add-remove"), RELATIONS, RunConfig.DP_RELATION),
            **kwargs,
        )

    # -- properties ------------------------------------------------------------------
    @property
    def relation_text(self) -> str:
        """The neighbouring relation (and sampling) epsilon is accounted under, in words."""
        if self.distributed:
            return f"{RELATION_NAMES[self.relation]}; no sampling amplification"
        return NEIGHBOURING[self.sampling]

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the budget's delta."""
        return self.budget.epsilon_spent

    def privacy_spent(self) -> PrivacySpent:
        """The user-level spending as Flower's own :class:`flwr.serverapp.PrivacySpent`
        (epsilon at the budget's delta, rounds accounted, and the method: accountant,
        mechanism and neighbouring relation)."""
        mechanism = ("Skellam (Agarwal et al. 2021)" if self.distributed or self.secure_noise
                     else "Gaussian")
        return PrivacySpent(
            epsilon=float(self.epsilon), delta=self.budget.delta,
            num_releases=self.budget.num_steps,
            accounting_method=f"{self.budget.accountant}; {mechanism}; {self.relation_text}",
        )

    def privacy_config(self) -> PrivacyConfig | None:
        """This accounting as Flower's :class:`flwr.serverapp.PrivacyConfig`, where
        Flower's RDP accountant can express it (central Gaussian noise, RDP, and a
        population for Poisson or fixed-size sampling); ``None`` otherwise (distributed
        or integer noise, PLD). Flower's ``WITHOUT_REPLACEMENT`` events take ``z``
        relative to the replace-one sensitivity: compose them with ``z / 2`` (a
        replaced client moves the clipped sum by ``2 C``)."""
        if self.distributed or self.secure_noise or self.budget.accountant != "rdp":
            return None
        if self.sampling == "none":
            relation, method = NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
            population = self.population or self.expected_contributors
        elif self.population is None:
            return None
        elif self.sampling == "poisson":
            relation, method = NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON
            population = self.population
        else:
            relation, method = NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT
            population = self.population
        return PrivacyConfig(
            target_delta=self.budget.delta, population_size=int(population),
            neighboring_relation=relation, sampling_method=method,
            max_epsilon=self.budget.max_epsilon if math.isfinite(self.budget.max_epsilon) else None,
        )

    def _count_stddev(self) -> float:
        assert self.adaptive is not None
        return self.adaptive.count_stddev or self.expected_contributors / 20.0

    def _update_noise_multiplier(self) -> float:
        if self.adaptive is None:
            return self.noise_multiplier
        return split_noise_multiplier(self.noise_multiplier, self._count_stddev())

    def summary(self) -> None:
        log(INFO, "\t├──> DPFedAvg (user-level DP, %s noise, fixed denominator %d):",
            "distributed Skellam" if self.distributed else "central Gaussian",
            self.expected_contributors)
        log(INFO, "\t│\t├── noise multiplier %s, clipping norm %s (%s)", self.noise_multiplier,
            self.clipping_norm, "adaptive" if self.adaptive else "fixed")
        log(INFO, "\t│\t└── budget epsilon %s at delta %s (%s; %s), spent %.4g",
            self.budget.max_epsilon, self.budget.delta, self.budget.accountant,
            self.relation_text, self.epsilon)
        super().summary()

    # -- training ----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = None
        self.bind_checkpoint(grid)
        if self.stopped_reason is not None:
            return []
        bad = [k for k, a in arrays.items() if not np.issubdtype(a.numpy().dtype, np.floating)]
        if bad:
            raise ValueError(f"DPFedAvg averages floating-point arrays only; not {bad}")
        config[TrainConfig.DP_CLIPPING_NORM] = self.clipping_norm
        config[TrainConfig.DP_ADAPTIVE_CLIPPING] = self.adaptive is not None
        config[TrainConfig.DP_DISTRIBUTED] = self.distributed
        if self.weight_key:
            config[TrainConfig.DP_WEIGHT_KEY] = self.weight_key
        if self.distributed:
            assert self.min_contributors is not None and self.quantization_step is not None
            config[TrainConfig.DP_NOISE_MULTIPLIER] = self.noise_multiplier
            config[TrainConfig.DP_MIN_CONTRIBUTORS] = int(self.min_contributors)
            config[TrainConfig.DP_QUANTIZATION_STEP] = float(self.quantization_step)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        decision = self.budget.can_afford(*self._planned_step(arrays))
        if not decision.allowed:
            self.stopped_reason = (
                f"privacy budget exhausted: round {server_round} not started, "
                f"{decision.message('it')} ({self.relation_text}); training stops and the "
                f"model of round "
                f"{server_round - 1} is kept"
            )
            log(WARNING, "DPFedAvg: %s", self.stopped_reason)
            return []
        if self.adaptive is not None:
            self._update_noise_multiplier()  # fail early on a bad stddev
        self._round = _Round(server_round, arrays, self.clipping_norm, self.sample_rate,
                             self.population)
        return messages

    def _skellam(self, dim: int, survivors: int) -> tuple[float, float, float]:
        """``(L2, L1, mu of the sum)`` of the survivors' Skellam noise (integer units)."""
        assert self.min_contributors is not None and self.quantization_step is not None
        l2 = quantised_l2_bound(self.clipping_norm, self.quantization_step, dim)
        mu = skellam_mu(self.noise_multiplier, self.clipping_norm, self.quantization_step,
                        dim, self.min_contributors)
        return l2, quantised_l1_bound(l2, dim), survivors * mu

    def _planned_step(self, arrays: ArrayRecord, survivors: int | None = None
                      ) -> tuple[float, float, int, int | None, tuple[float, float, float] | None,
                                 tuple[int, int] | None]:
        if not self.distributed:
            skellam = None
            if self.secure_noise:
                dim = sum(int(a.numpy().size) for a in arrays.values())
                _, skellam = central_skellam_parameters(self.noise_multiplier, self.clipping_norm, dim)
            return self.noise_multiplier, self.sample_rate, 1, self.population, skellam, None
        assert self.min_contributors is not None
        n = self.min_contributors if survivors is None else survivors
        dim = sum(int(a.numpy().size) for a in arrays.values())
        skellam = self._skellam(dim, n)
        effective = self.noise_multiplier * math.sqrt(n / self.min_contributors)
        leaving = (n, dim) if self.relation == "add-remove" else None
        return effective, 1.0, 1, None, skellam, leaving

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        state, self._round = self._round, None
        if state is None or state.number != server_round:
            if self.stopped_reason is not None:
                return None, None
            return self.strategy.aggregate_train(server_round, replies)
        keys = list(state.global_arrays.keys())
        global_nd = [a.astype(np.float64) for a in state.global_arrays.to_numpy_ndarrays()]
        valid = [r for r in replies if not r.has_error()]
        if self.distributed:
            parsed_all = self._parse_distributed(server_round, valid, keys, global_nd)
        else:
            parsed_all = [p for p in (self._parse(r, keys, global_nd, state.clipping_norm,
                                                  len(valid) == 1) for r in valid) if p]
        if not parsed_all:
            log(WARNING, "DPFedAvg: round %d has no usable reply; model unchanged", server_round)
            return None, None
        total = [np.zeros_like(g) for g in global_nd]
        contributors, centred, used = 0, 0.0, []
        for reply, update, count, centred_bits in parsed_all:
            for acc, u in zip(total, update, strict=True):
                acc += u
            contributors += count
            centred += centred_bits
            used.append(reply)

        denominator = self.expected_contributors
        z_spent = self.noise_multiplier
        skellam: tuple[float, float, float] | None = None
        leaving: tuple[int, int] | None = None
        if self.distributed:  # the sum already carries the clients' Skellam noise
            std = 0.0
            z_spent, _, _, _, skellam, leaving = self._planned_step(state.global_arrays,
                                                                    contributors)
            if contributors < int(self.min_contributors or 1):
                log(WARNING, "DPFedAvg: only %d of the %d contributors the noise was scaled "
                    "for: accounted with noise multiplier %.4g", contributors,
                    self.min_contributors, z_spent)
        elif self.secure_noise:
            noised_sum, skellam = add_skellam_noise_to_sum(total, self.noise_multiplier,
                                                           state.clipping_norm, self.rng)
            total = [t / denominator for t in noised_sum]
            step, _ = central_skellam_parameters(self.noise_multiplier, state.clipping_norm,
                                                 sum(t.size for t in total))
            std = step * math.sqrt(2 * skellam[2]) / denominator  # real units, on the mean
        else:
            std = central_noise_std(self._update_noise_multiplier(), state.clipping_norm,
                                    denominator)
        noised = add_gaussian_noise([t / denominator for t in total], std, self.rng) \
            if not self.secure_noise else total
        dtypes = [a.dtype for a in state.global_arrays.to_numpy_ndarrays()]
        new_arrays = ArrayRecord(
            {k: Array((g + u).astype(dt)) for k, g, u, dt in zip(keys, global_nd, noised, dtypes, strict=True)}
        )
        for reply in used:  # every reply now carries the same, noised aggregate
            self._rewrite(reply, new_arrays)
        _, metrics = self.strategy.aggregate_train(server_round, used)

        epsilon = self._spend(z_spent, state, skellam, leaving)
        clipping_norm_used = state.clipping_norm
        if self.adaptive is not None:
            self.clipping_norm, _ = update_clipping_norm(
                clipping_norm_used, centred, denominator, self.adaptive.target_quantile,
                self.adaptive.learning_rate, self._count_stddev(), self.rng,
            )
            self.budget.extra["clipping-norm"] = self.clipping_norm
            self.budget.save()
        log(INFO, "DPFedAvg: round %d, %d contributors, mean over %d, noise std %.4g (C=%.4g), "
            "epsilon %.4g of %.4g (%s)", server_round, contributors, denominator, std,
            clipping_norm_used, epsilon, self.budget.max_epsilon, self.relation_text)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics[ServerMetrics.DP_EPSILON] = epsilon
        metrics[ServerMetrics.DP_CLIPPING_NORM] = clipping_norm_used
        metrics[ServerMetrics.DP_NOISE_STD] = std
        return new_arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped_reason is not None:
            return []  # the model no longer changes: nothing new to evaluate
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    # -- helpers -----------------------------------------------------------------------
    def _spend(self, noise_multiplier: float, state: _Round,
               skellam: tuple[float, float, float] | None,
               leaving: tuple[int, int] | None = None) -> float:
        """Record the round; a round released with less noise than planned is still
        recorded (it happened), even past the budget, and stops the run."""
        decision = self.budget.can_afford(noise_multiplier, state.sample_rate,
                                          population=state.population, skellam=skellam,
                                          leaving_shares=leaving)
        self.budget.ledger.add(noise_multiplier, state.sample_rate, population=state.population,
                               skellam=skellam, leaving_shares=leaving)
        self.budget.save()
        if not decision.allowed:
            self.stopped_reason = (f"privacy budget exceeded by round {state.number} "
                                   f"({decision.message('it')}; {self.relation_text}); "
                                   "training stops")
            log(WARNING, "DPFedAvg: %s", self.stopped_reason)
        return decision.epsilon_after

    @staticmethod
    def _metrics(reply: Message) -> MetricRecord:
        records = list(reply.content.metric_records.values())
        return records[0] if records else MetricRecord()

    def _arrays_diff(self, reply: Message, keys: list[str], global_nd: list[np.ndarray]
                     ) -> list[np.ndarray] | None:
        node = reply.metadata.src_node_id
        records = list(reply.content.array_records.values())
        if len(records) != 1 or list(records[0].keys()) != keys:
            log(WARNING, "DPFedAvg: reply of node %s dropped: arrays do not match the model", node)
            return None
        local = records[0].to_numpy_ndarrays()
        if any(a.shape != g.shape for a, g in zip(local, global_nd, strict=True)):
            log(WARNING, "DPFedAvg: reply of node %s dropped: array shapes differ", node)
            return None
        return [a.astype(np.float64) - g for a, g in zip(local, global_nd, strict=True)]

    def _weight(self, metrics: MetricRecord) -> float:
        return number(metrics.get(self.weight_key, 1.0), self.weight_key) if self.weight_key else 1.0

    def _parse_distributed(
        self, server_round: int, valid: list[Message], keys: list[str], global_nd: list[np.ndarray]
    ) -> list[tuple[Message, list[np.ndarray], int, float]]:
        """The SecAgg+ aggregate, checked: every contributor clipped and noised."""
        fix = ("wrap it as SecAggPlus(DPFedAvg(..., distributed=True), "
               "masked_metrics=DPFedAvg.MASKED_METRICS) and put secaggplus_mod and "
               "update_clipping_mod (inside it) on the clients")
        if len(valid) > 1:
            raise DPConfigurationError(
                f"DPFedAvg(distributed=True) got {len(valid)} separate replies in round "
                f"{server_round}: no SecAgg+ layer adds the clients' noise, the exact mean "
                f"would be released; {fix}")
        if not valid:
            return []
        reply = valid[0]
        metrics = self._metrics(reply)
        if ReplyMetrics.DP_CLIPPED_COUNT not in metrics or ReplyMetrics.DP_NOISED_COUNT not in metrics:
            raise DPConfigurationError(
                f"DPFedAvg(distributed=True): the aggregate of round {server_round} carries no "
                f"masked {ReplyMetrics.DP_CLIPPED_COUNT!r} / {ReplyMetrics.DP_NOISED_COUNT!r} counts, "
                "so nothing proves the "
                f"clients clipped and noised; {fix}")
        try:
            weight = self._weight(metrics)
            clipped = number(metrics[ReplyMetrics.DP_CLIPPED_COUNT], ReplyMetrics.DP_CLIPPED_COUNT)
            noised = number(metrics[ReplyMetrics.DP_NOISED_COUNT], ReplyMetrics.DP_NOISED_COUNT)
        except TypeError as err:
            log(WARNING, "DPFedAvg: round %d refused: %s; model unchanged", server_round, err)
            return []
        if not (weight >= 1 and weight == clipped == noised and weight == int(weight)):
            log(WARNING, "DPFedAvg: round %d refused: %s contributors, %s clipped, %s noised "
                "(a client without update_clipping_mod or without the noise); model unchanged",
                server_round, weight, clipped, noised)
            return []
        diff = self._arrays_diff(reply, keys, global_nd)
        if diff is None:
            return []
        if not all(np.isfinite(u).all() for u in diff):
            log(WARNING, "DPFedAvg: the aggregate holds NaN/Inf; round %d dropped", server_round)
            return []
        # SecAgg+'s reply is global + the mean update over `weight` contributors.
        return [(reply, [u * weight for u in diff], int(weight), 0.0)]

    def _parse(
        self, reply: Message, keys: list[str], global_nd: list[np.ndarray], clipping_norm: float,
        alone: bool,
    ) -> tuple[Message, list[np.ndarray], int, float] | None:
        """:meth:`_parse_reply`, with a reply whose metrics have the wrong type (a list
        where a count belongs) dropped with a logged reason instead of ending the run."""
        try:
            return self._parse_reply(reply, keys, global_nd, clipping_norm, alone)
        except (TypeError, ValueError) as err:
            log(WARNING, "DPFedAvg: reply of node %s dropped: %s", reply.metadata.src_node_id, err)
            return None

    def _parse_reply(
        self, reply: Message, keys: list[str], global_nd: list[np.ndarray], clipping_norm: float,
        alone: bool,
    ) -> tuple[Message, list[np.ndarray], int, float] | None:
        """``(reply, clipped sum, contributors, sum of centred bits)``, or None to drop.

        A reply standing for ``k > 1`` clients (SecAgg+'s aggregate) is accepted only if
        its masked ``dp-clipped-count`` equals its weight ``k``: a single reply never
        sets the count by its weight alone. Any other reply is one client, clipped here
        (defence in depth: central DP trusts the server).
        """
        node = reply.metadata.src_node_id
        metrics = self._metrics(reply)
        weight = self._weight(metrics)
        if not (weight >= 1 and math.isfinite(weight)):
            log(WARNING, "DPFedAvg: reply of node %s dropped: weight %s is not >= 1", node, weight)
            return None
        diff = self._arrays_diff(reply, keys, global_nd)
        if diff is None:
            return None
        clipped = metrics.get(ReplyMetrics.DP_CLIPPED_COUNT)
        if alone and weight > 1:
            if clipped is None:
                log(ERROR, "DPFedAvg: round refused: one reply of weight %s and no masked "
                    "%r. If it is SecAgg+'s aggregate, pass SecAggPlus(DPFedAvg(...), "
                    "masked_metrics=DPFedAvg.MASKED_METRICS) and put update_clipping_mod on "
                    "the clients; a client's own reply must weigh 1 (update_clipping_mod)",
                    weight, ReplyMetrics.DP_CLIPPED_COUNT)
                return None
            if number(clipped, ReplyMetrics.DP_CLIPPED_COUNT) != weight or weight != int(weight):
                log(WARNING, "DPFedAvg: aggregate refused: weight %s but %s contributors "
                    "proved their clipping; model unchanged", weight, clipped)
                return None
            if not all(np.isfinite(u).all() for u in diff):
                log(WARNING, "DPFedAvg: the aggregate holds NaN/Inf; round dropped")
                return None
            count = int(weight)
            bits = number(metrics.get(ReplyMetrics.DP_UNCLIPPED_COUNT, 0.0), ReplyMetrics.DP_UNCLIPPED_COUNT)
            return reply, [u * count for u in diff], count, min(max(bits, 0.0), count) - count / 2
        if weight != 1:
            log(WARNING, "DPFedAvg: node %s weighs %s, not 1 (no update_clipping_mod?): "
                "counted as one client", node, weight)
        try:
            update, norm, is_unclipped = clip_update(diff, clipping_norm)
        except ValueError as err:
            log(WARNING, "DPFedAvg: reply of node %s dropped: %s", node, err)
            return None
        if norm > clipping_norm * (1 + 1e-4):
            log(WARNING, "DPFedAvg: node %s sent an unclipped update (norm %.4g > C=%.4g): "
                "clipped on the server; add update_clipping_mod to the ClientApp",
                node, norm, clipping_norm)
        # Andrew et al.'s bit, centred: b - 1/2 (sensitivity 1/2 of the sum).
        return reply, update, 1, (1.0 if is_unclipped else 0.0) - 0.5

    @staticmethod
    def _rewrite(reply: Message, arrays: ArrayRecord) -> None:
        name = next(iter(reply.content.array_records))
        reply.content[name] = arrays
        for metrics_name, metrics in list(reply.content.metric_records.items()):
            kept = MetricRecord({k: v for k, v in metrics.items() if k not in DP_METRIC_KEYS})
            reply.content[metrics_name] = kept
