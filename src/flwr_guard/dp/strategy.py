"""Flower adapter: ``DPFedAvg``, central noise and a privacy budget around any strategy.

User-level DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et al.
2021), as a :class:`~flwr_guard.strategy_wrapper.StrategyWrapper`::

    strategy = DPFedAvg(FedAvg(...), noise_multiplier=1.0, clipping_norm=0.5,
                        max_epsilon=8.0, delta=1e-5, checkpoint="privacy.json")
    # with secure aggregation (flwr-guard SecAgg+): SecAggPlus(DPFedAvg(FedAvg(...)), ...)

Clients clip with :func:`~flwr_guard.dp.mods.update_clipping_mod`. Each round:

1. ``configure_train`` sends the clipping norm ``C_t`` (and whether clipping is
   adaptive) in the train config, lets the wrapped strategy sample the cohort, and asks
   the budget whether this round fits ``max_epsilon``. If it does not, it sends nothing,
   logs why, and every later round is skipped: the run ends keeping the last model.
2. ``aggregate_train`` computes the **uniform** mean of the clipped updates (the clipping
   mod sets each client's weight — the wrapped strategy's ``weighted_by_key`` — to 1;
   the single aggregate reply that SecAgg+ hands down carries the number of clients it
   sums as its weight), adds ``N(0, (z C_t / n)^2)`` noise — the sensitivity of
   exactly what it averages, with the clipping norm the clients *used* this round — and
   hands the wrapped strategy replies that all carry ``global + noised mean``, so FedAvg
   (whatever its ``weighted_by_key``), FedAdam, FedProx... post-process the noised
   aggregate and never average anything else. Then it spends the round on the budget
   (checkpointed), and, under adaptive clipping, moves ``C`` with the noised count.

What this fixes relative to Flower's DP wrappers: the adaptive ones noise with the
*updated* clipping norm (the noise must match the norm the clients clipped to); all of
them noise ``z C / n`` but let FedAvg average with example weights, whose sensitivity is
``C * w_max / sum w``, not ``C / n``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_guard.dp.accounting import AccountantKind, Sampling
from flwr_guard.dp.budget import PrivacyBudget
from flwr_guard.dp.central import add_gaussian_noise, central_noise_std
from flwr_guard.dp.clipping import clip_update, split_noise_multiplier, update_clipping_norm
from flwr_guard.dp.mods import KEY_ADAPTIVE, KEY_CLIPPING_NORM, KEY_UNCLIPPED, KEY_WEIGHT_KEY
from flwr_guard.strategy_wrapper import StrategyWrapper

DP_METRIC_KEYS = (KEY_UNCLIPPED,)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021 adaptive clipping.

    Attributes:
        target_quantile: ``gamma``, the fraction of updates to leave unclipped.
        learning_rate: ``eta_C`` of the geometric update (0.2 in the paper).
        count_stddev: ``sigma_b``, noise std of the unclipped count; ``None`` = the
            paper's ``expected clients / 20``. Must exceed ``noise_multiplier / 2``.
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
    population: int
    cohort: int


class DPFedAvg(StrategyWrapper):
    """Central user-level DP with a budget, around any ``flwr.serverapp`` strategy.

    Args:
        strategy: the wrapped strategy (FedAvg, FedAdam, ... or flwr-guard wrappers).
        noise_multiplier: ``z``, noise std on the sum of clipped updates / ``C``; the
            value the round is accounted with (under adaptive clipping the updates get
            ``z_delta`` of :func:`~flwr_guard.dp.clipping.split_noise_multiplier`).
        clipping_norm: ``C`` (the initial one under adaptive clipping), L2, model units.
        adaptive: :class:`AdaptiveClipping` to adapt ``C``, or ``None`` for fixed.
        max_epsilon: the budget at ``delta`` (``inf`` = account, never stop).
        delta: target delta (choose ``< 1 / population``).
        sample_rate: client sampling rate ``q`` for accounting; ``None`` = the realised
            ``cohort / connected nodes`` of each round (say which in your docs: the
            population a user belongs to is what ``q`` must be relative to).
        population: ``N`` for ``sampling="fixed-size"``; ``None`` = connected nodes.
        accountant, sampling: see :mod:`flwr_guard.dp.accounting`.
        checkpoint: JSON file of the privacy ledger (and adaptive ``C``); loaded if
            present, so a restarted ServerApp continues from the epsilon spent.
        distributed: the clients add the noise (Skellam through SecAgg+, see
            :mod:`flwr_guard.dp.distributed`): this wrapper adds none, sends
            ``dp-noise-multiplier`` and ``dp-min-contributors`` in the train config, and
            accounts each round with ``z * sqrt(n / min_contributors)`` when only
            ``n < min_contributors`` clients' noise reached the sum.
        min_contributors: with ``distributed``, the survivors each client's noise is
            scaled for (``num_clients`` of ``DistributedNoise.calibrate``).
        rng: NumPy generator for the noise; ``None`` = seeded from the OS. Never pass a
            fixed seed in production.

    Raises:
        ValueError: for invalid parameters (also from the budget and checkpoint).
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        *,
        adaptive: AdaptiveClipping | None = None,
        max_epsilon: float = math.inf,
        delta: float = 1e-5,
        sample_rate: float | None = None,
        population: int | None = None,
        accountant: AccountantKind = "rdp",
        sampling: Sampling = "poisson",
        checkpoint: str | None = None,
        distributed: bool = False,
        min_contributors: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(strategy)
        if distributed and (min_contributors is None or min_contributors < 1):
            raise ValueError("distributed DP needs min_contributors >= 1: the number of "
                             "clients whose noise the sum is guaranteed to hold")
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise multiplier must be finite and > 0, got {noise_multiplier}")
        if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            raise ValueError(f"clipping norm must be finite and > 0, got {clipping_norm}")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.adaptive = adaptive
        self.sample_rate = sample_rate
        self.population = population
        self.budget = PrivacyBudget(max_epsilon, delta, accountant, sampling, checkpoint)
        if "clipping-norm" in self.budget.extra:  # restarted: continue the adapted norm
            self.clipping_norm = float(self.budget.extra["clipping-norm"])
        self.weight_key: str | None = getattr(strategy, "weighted_by_key", None)
        self.distributed = distributed
        self.min_contributors = min_contributors
        self.rng = rng if rng is not None else np.random.default_rng()
        self.stopped_reason: str | None = None
        self._round: _Round | None = None

    @classmethod
    def from_run_config(cls, strategy: Strategy, run_config: Mapping[str, Any],
                        **kwargs: Any) -> DPFedAvg:
        """Build from ``dp-*`` run-config keys (see docs/privacy.md for the table).

        Required: ``dp-noise-multiplier``, ``dp-clipping-norm``. Optional:
        ``dp-max-epsilon`` (0 = no limit), ``dp-delta``, ``dp-sample-rate`` (0 = realised),
        ``dp-accountant``, ``dp-sampling``, ``dp-checkpoint`` ("" = none),
        ``dp-adaptive-clipping`` (bool), ``dp-target-quantile``, ``dp-clip-learning-rate``,
        ``dp-clipped-count-stddev`` (0 = expected clients / 20), ``dp-distributed``
        (bool), ``dp-min-contributors``.
        """
        def get(key: str, default: Any) -> Any:
            return run_config.get(f"dp-{key}", default)

        missing = [k for k in ("dp-noise-multiplier", "dp-clipping-norm") if k not in run_config]
        if missing:
            raise KeyError(f"DPFedAvg needs {', '.join(missing)} in the run config")
        adaptive = None
        if bool(get("adaptive-clipping", False)):
            adaptive = AdaptiveClipping(
                float(get("target-quantile", 0.5)),
                float(get("clip-learning-rate", 0.2)),
                float(get("clipped-count-stddev", 0.0)) or None,
            )
        return cls(
            strategy,
            noise_multiplier=float(run_config["dp-noise-multiplier"]),
            clipping_norm=float(run_config["dp-clipping-norm"]),
            adaptive=adaptive,
            max_epsilon=float(get("max-epsilon", 0.0)) or math.inf,
            delta=float(get("delta", 1e-5)),
            sample_rate=float(get("sample-rate", 0.0)) or None,
            accountant=str(get("accountant", "rdp")),  # type: ignore[arg-type]
            sampling=str(get("sampling", "poisson")),  # type: ignore[arg-type]
            checkpoint=str(get("checkpoint", "")) or None,
            distributed=bool(get("distributed", False)),
            min_contributors=int(get("min-contributors", 0)) or None,
            **kwargs,
        )

    # -- properties ------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the budget's delta."""
        return self.budget.epsilon_spent

    def _expected_cohort(self, grid: Grid) -> int:
        fraction = float(getattr(self.strategy, "fraction_train", 1.0))
        return max(1, int(len(list(grid.get_node_ids())) * fraction))

    def _count_stddev(self, cohort: int) -> float:
        assert self.adaptive is not None
        return self.adaptive.count_stddev or cohort / 20.0

    def _update_noise_multiplier(self, cohort: int) -> float:
        if self.adaptive is None:
            return self.noise_multiplier
        return split_noise_multiplier(self.noise_multiplier, self._count_stddev(cohort))

    def summary(self) -> None:
        log(INFO, "\t├──> DPFedAvg (user-level DP, uniform mean, %s noise):",
            "distributed" if self.distributed else "central")
        log(INFO, "\t│\t├── noise multiplier %s, clipping norm %s (%s)", self.noise_multiplier,
            self.clipping_norm, "adaptive" if self.adaptive else "fixed")
        log(INFO, "\t│\t└── budget epsilon %s at delta %s (%s, %s sampling), spent %.4g",
            self.budget.max_epsilon, self.budget.delta, self.budget.accountant,
            self.budget.sampling, self.epsilon)
        super().summary()

    # -- training ----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = None
        if self.stopped_reason is not None:
            return []
        bad = [k for k, a in arrays.items() if not np.issubdtype(a.numpy().dtype, np.floating)]
        if bad:
            raise ValueError(f"DPFedAvg averages floating-point arrays only; not {bad}")
        config[KEY_CLIPPING_NORM] = self.clipping_norm
        config[KEY_ADAPTIVE] = self.adaptive is not None
        if self.weight_key:
            config[KEY_WEIGHT_KEY] = self.weight_key
        if self.distributed:
            config["dp-noise-multiplier"] = self._update_noise_multiplier(self._expected_cohort(grid))
            config["dp-min-contributors"] = int(self.min_contributors or 1)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        connected = max(len(list(grid.get_node_ids())), len(messages))
        population = self.population or connected
        rate = self.sample_rate or len(messages) / population
        decision = self.budget.can_afford(self.noise_multiplier, rate, population=population)
        if not decision.allowed:
            self.stopped_reason = (
                f"privacy budget exhausted: round {server_round} not started, "
                f"{decision.message('it')}; training stops and the model of round "
                f"{server_round - 1} is kept"
            )
            log(WARNING, "DPFedAvg: %s", self.stopped_reason)
            return []
        if self.adaptive is not None:
            self._update_noise_multiplier(len(messages))  # fail early on a bad stddev
        self._round = _Round(server_round, arrays, self.clipping_norm, rate, population,
                             len(messages))
        return messages

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
        total = [np.zeros_like(g) for g in global_nd]
        contributors, unclipped, used = 0.0, 0.0, []
        valid = [r for r in replies if not r.has_error()]
        for reply in valid:
            parsed = self._parse(reply, keys, global_nd, state.clipping_norm, len(valid) == 1)
            if parsed is None:
                continue
            update, weight, bits = parsed
            for acc, u in zip(total, update, strict=True):
                acc += weight * u
            contributors += weight
            unclipped += bits
            used.append(reply)
        if not used:
            log(WARNING, "DPFedAvg: round %d has no usable reply; model unchanged", server_round)
            return None, None

        n = int(round(contributors))
        z_update = self._update_noise_multiplier(state.cohort)
        z_spent = self.noise_multiplier
        if self.distributed:  # the sum already carries the clients' Skellam noise
            std = 0.0
            floor = int(self.min_contributors or 1)
            if n < floor:
                z_spent *= math.sqrt(n / floor)
                log(WARNING, "DPFedAvg: only %d of the %d contributors the noise was scaled "
                    "for: accounted with noise multiplier %.4g", n, floor, z_spent)
        else:
            std = central_noise_std(z_update, state.clipping_norm, n)
        noised = add_gaussian_noise([t / contributors for t in total], std, self.rng)
        dtypes = [a.dtype for a in state.global_arrays.to_numpy_ndarrays()]
        new_arrays = ArrayRecord(
            {k: Array((g + u).astype(dt)) for k, g, u, dt in zip(keys, global_nd, noised, dtypes, strict=True)}
        )
        for reply in used:  # every reply now carries the same, noised aggregate
            self._rewrite(reply, new_arrays)
        _, metrics = self.strategy.aggregate_train(server_round, used)

        epsilon = self._spend(z_spent, state)
        clipping_norm_used = state.clipping_norm
        if self.adaptive is not None:
            self.clipping_norm, _ = update_clipping_norm(
                clipping_norm_used, unclipped, state.cohort, self.adaptive.target_quantile,
                self.adaptive.learning_rate, self._count_stddev(state.cohort), self.rng,
            )
            self.budget.extra["clipping-norm"] = self.clipping_norm
            self.budget.save()
        log(INFO, "DPFedAvg: round %d, %d contributors, noise std %.4g (C=%.4g), epsilon %.4g "
            "of %.4g", server_round, n, std, clipping_norm_used, epsilon, self.budget.max_epsilon)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["dp-epsilon"] = epsilon
        metrics["dp-clipping-norm"] = clipping_norm_used
        metrics["dp-noise-std"] = std
        metrics["dp-contributors"] = n
        return new_arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped_reason is not None:
            return []  # the model no longer changes: nothing new to evaluate
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    # -- helpers -----------------------------------------------------------------------
    def _spend(self, noise_multiplier: float, state: _Round) -> float:
        """Record the round; a round released with less noise than planned is still
        recorded (it happened), even past the budget, and stops the run."""
        decision = self.budget.can_afford(noise_multiplier, state.sample_rate,
                                          population=state.population)
        self.budget.ledger.add(noise_multiplier, state.sample_rate, population=state.population)
        self.budget.save()
        if not decision.allowed:
            self.stopped_reason = (f"privacy budget exceeded by round {state.number} "
                                   f"({decision.message('it')}); training stops")
            log(WARNING, "DPFedAvg: %s", self.stopped_reason)
        return decision.epsilon_after

    def _parse(
        self, reply: Message, keys: list[str], global_nd: list[np.ndarray], clipping_norm: float,
        alone: bool,
    ) -> tuple[list[np.ndarray], float, float] | None:
        """``(clipped update, weight, unclipped count)`` of a reply, or None to drop it.

        A weight other than 1 is accepted only from a reply that is alone in the round
        (the aggregate of secure aggregation); among several replies it is a client that
        skipped the clipping mod (or lies) and counts as one client.
        """
        node = reply.metadata.src_node_id
        records = list(reply.content.array_records.values())
        metric_records = list(reply.content.metric_records.values())
        if len(records) != 1 or list(records[0].keys()) != keys:
            log(WARNING, "DPFedAvg: reply of node %s dropped: arrays do not match the model", node)
            return None
        metrics = metric_records[0] if metric_records else MetricRecord()
        weight = float(metrics.get(self.weight_key, 1.0)) if self.weight_key else 1.0  # type: ignore[arg-type]
        if not (weight >= 1 and math.isfinite(weight)):
            log(WARNING, "DPFedAvg: reply of node %s dropped: weight %s is not >= 1", node, weight)
            return None
        if weight != 1 and not alone:
            log(WARNING, "DPFedAvg: node %s weighs %s, not 1 (no update_clipping_mod?): "
                "counted as one client", node, weight)
            weight = 1.0
        local = records[0].to_numpy_ndarrays()
        if any(a.shape != g.shape for a, g in zip(local, global_nd, strict=True)):
            log(WARNING, "DPFedAvg: reply of node %s dropped: array shapes differ", node)
            return None
        diff = [a.astype(np.float64) - g for a, g in zip(local, global_nd, strict=True)]
        if alone and self.distributed and weight > 1:
            # SecAgg+'s aggregate already carries the clients' Skellam noise: its norm
            # exceeds C by design, and clipping it here would scale the noise away.
            if not all(np.isfinite(u).all() for u in diff):
                log(WARNING, "DPFedAvg: the aggregate holds NaN/Inf; round dropped")
                return None
            count = float(metrics.get(KEY_UNCLIPPED, 0.0))  # type: ignore[arg-type]
            return diff, weight, min(max(count, 0.0), weight)
        try:
            # Defence in depth: a client that skipped the mod is clipped here (central
            # DP trusts the server); a mean of clipped updates is never changed by it.
            update, norm, is_unclipped = clip_update(
                diff, clipping_norm,
            )
        except ValueError as err:
            log(WARNING, "DPFedAvg: reply of node %s dropped: %s", node, err)
            return None
        if norm > clipping_norm * (1 + 1e-4):
            log(WARNING, "DPFedAvg: node %s sent an unclipped update (norm %.4g > C=%.4g): "
                "clipped on the server; add update_clipping_mod to the ClientApp",
                node, norm, clipping_norm)
        # dp-unclipped-count: how many of the reply's clients were left unclipped (a bit
        # for one client; SecAgg+ hands down the survivors' sum when it is masked).
        count = float(metrics.get(KEY_UNCLIPPED, weight * float(is_unclipped)))  # type: ignore[arg-type]
        return update, weight, min(max(count, 0.0), weight)

    @staticmethod
    def _rewrite(reply: Message, arrays: ArrayRecord) -> None:
        name = next(iter(reply.content.array_records))
        reply.content[name] = arrays
        for metrics_name, metrics in list(reply.content.metric_records.items()):
            kept = MetricRecord({k: v for k, v in metrics.items() if k not in DP_METRIC_KEYS})
            reply.content[metrics_name] = kept
