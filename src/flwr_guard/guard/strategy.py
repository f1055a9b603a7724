"""Flower façade for the server side: :class:`GuardedStrategy`.

One wrapper declares the server's protections and builds flwr-guard's strategy wrappers
in the one valid order around the user's strategy::

    strategy = GuardedStrategy(
        FedAvg(...),
        secagg=SecAgg(),
        dp=CentralDP(noise_multiplier=1.0, clipping_norm=0.5, max_epsilon=8.0),
        telemetry=context,          # Prometheus exporter from the run config
    )
    strategy.start(grid, initial_arrays, num_rounds=...)

The chain, outermost first::

    GuardedStrategy       the round loop; the manifest; one line per round in Flower's log
      TelemetryStrategy   Prometheus metrics of every round   (telemetry=context)
        AuditSummary      the round's worst-case leakage-audit scores (audit_summary=True)
          SecAggPlus      the server sees only the masked sum  (secagg=SecAgg(...))
            DPFedAvg      user-level DP, budget, accounting     (dp=CentralDP/DistributedDP)
              ReplyGuard  drops replies that carry more than the update (reply_guard=True)
                strategy  the user's FedAvg, FedProx, FedAdam, ...

Every round's train config carries the :class:`~flwr_guard.guard.manifest.ProtectionManifest`
of this chain; clients check it against their own policy (:class:`ClientGuard`). Unsupported
combinations raise at construction. A run in which no round produced an aggregate, or whose
clients all refuse the server's protections, raises instead of ending "completed".

The individual wrappers stay public for experts (``flwr_guard.secagg.SecAggPlus``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any, ClassVar, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import Result, Strategy

from flwr_guard.errors import FlwrGuardError
from flwr_guard.guard.manifest import (
    MANIFEST_KEY,
    DPMode,
    DPTerms,
    ManifestError,
    ProtectionManifest,
    SecAggTerms,
)
from flwr_guard.guard.refusal_reasons import RefusalLog, mismatch_message, refusals_stop_run
from flwr_guard.guard.reply_consistency import consistent_replies
from flwr_guard.guard.round_log import (
    GuardMismatch,
    describe_round,
    failure_reason,
)
from flwr_guard.keys import RunConfig
from flwr_guard.strategy_wrapper import StrategyWrapper


class RoundObserver(Protocol):
    """What :class:`GuardedStrategy` tells an observer after each round."""

    def train_aggregated(self, server_round: int, replies: list[Message],
                         metrics: MetricRecord | None) -> None: ...

    def evaluate_aggregated(self, server_round: int, metrics: MetricRecord | None) -> None: ...


class GuardConfigError(FlwrGuardError, ValueError):
    """A combination of protections that cannot work; the message names the fix."""


class NoAggregate(FlwrGuardError, RuntimeError):
    """No round of the run produced an aggregate (the model was never updated)."""


# Run-config keys read by SecAgg.from_run_config.
SECAGG_KEY = RunConfig.SECAGG
SECAGG_NUM_SHARES_KEY = RunConfig.SECAGG_NUM_SHARES
SECAGG_THRESHOLD_KEY = RunConfig.SECAGG_RECONSTRUCTION_THRESHOLD
SECAGG_CLIPPING_RANGE_KEY = RunConfig.SECAGG_CLIPPING_RANGE
SECAGG_QUANTIZATION_RANGE_KEY = RunConfig.SECAGG_QUANTIZATION_RANGE
SECAGG_TIMEOUT_KEY = RunConfig.SECAGG_TIMEOUT
SECAGG_MULTI_ROUND_KEY = RunConfig.SECAGG_MULTI_ROUND
SECAGG_MAX_COLLUDERS_KEY = RunConfig.SECAGG_MAX_COLLUDERS


@dataclass(frozen=True)
class SecAgg:
    """SecAgg+ on the server (:class:`flwr_guard.secagg.SecAggPlus`); fields as there.

    ``num_shares`` and ``reconstruction_threshold`` ``None`` = chosen for each round's
    cohort. Clients enforce their own floors on both. ``multi_round`` (default): keys
    set up once while the cohort stays within the set-up's, three messages per round
    (:mod:`flwr_guard.secagg.session_client`); ``False``: fresh keys every round.
    """

    num_shares: int | None = None
    reconstruction_threshold: int | None = None
    clipping_range: float = 2.0
    quantization_range: int = 2**16
    timeout: float = 300.0
    multi_round: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def terms(self) -> SecAggTerms:
        return SecAggTerms(self.num_shares, self.reconstruction_threshold,
                           float(self.clipping_range), int(self.quantization_range))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SecAgg | None:
        """The ``secagg-*`` keys of a run config (``pyproject.toml``'s
        ``[tool.flwr.app.config]``), or ``None`` when ``secagg`` is false.

        Keys (absent = the field's default): ``secagg`` (bool, default true),
        ``secagg-num-shares`` and ``secagg-reconstruction-threshold`` (int; 0 = chosen
        per cohort), ``secagg-clipping-range`` (float, model units),
        ``secagg-quantization-range`` (int), ``secagg-timeout`` (seconds),
        ``secagg-multi-round`` (bool), ``secagg-max-colluders`` (int, C, the colluders
        the default threshold is chosen for; -1 = derived from the connected nodes).
        Clients still enforce their own floors.

        Raises:
            GuardConfigError: a value of the wrong type or out of range, naming the key.
        """
        def get(key: str, kind: type, default: Any) -> Any:
            value = run_config.get(key, default)
            try:
                if kind is bool:
                    if not isinstance(value, bool):
                        raise TypeError
                    return value
                return kind(value)
            except (TypeError, ValueError):
                raise GuardConfigError(
                    f"run config {key} = {value!r}: expected {kind.__name__}") from None

        if not get(SECAGG_KEY, bool, True):
            return None
        shares = get(SECAGG_NUM_SHARES_KEY, int, 0)
        threshold = get(SECAGG_THRESHOLD_KEY, int, 0)
        for key, value in ((SECAGG_NUM_SHARES_KEY, shares), (SECAGG_THRESHOLD_KEY, threshold)):
            if value < 0:
                raise GuardConfigError(f"run config {key} = {value}: expected >= 0 (0 = per cohort)")
        defaults = cls()
        colluders = get(SECAGG_MAX_COLLUDERS_KEY, int, -1)
        if colluders < -1:
            raise GuardConfigError(
                f"run config {SECAGG_MAX_COLLUDERS_KEY} = {colluders}: expected >= 0, or -1 (derived)")
        return cls(
            num_shares=shares or None,
            reconstruction_threshold=threshold or None,
            clipping_range=get(SECAGG_CLIPPING_RANGE_KEY, float, defaults.clipping_range),
            quantization_range=get(SECAGG_QUANTIZATION_RANGE_KEY, int, defaults.quantization_range),
            timeout=get(SECAGG_TIMEOUT_KEY, float, defaults.timeout),
            multi_round=get(SECAGG_MULTI_ROUND_KEY, bool, defaults.multi_round),
            options={"max_colluders": colluders} if colluders >= 0 else {},
        )


@dataclass(frozen=True)
class CentralDP:
    """User-level DP with Gaussian noise added by the server (:class:`flwr_guard.dp.DPFedAvg`).

    Attributes:
        noise_multiplier: z; clipping_norm: C (L2, model units).
        expected_contributors: n, the fixed denominator of the mean (the expected cohort
            size; see :class:`flwr_guard.dp.DPFedAvg`).
        max_epsilon, delta: the budget (``inf`` = account, never stop).
        adaptive: :class:`flwr_guard.dp.strategy.AdaptiveClipping`, or ``None``.
        options: further keyword arguments of ``DPFedAvg`` (accountant, sampling,
            checkpoint, secure_noise, ...), passed unchanged.
    """

    noise_multiplier: float
    clipping_norm: float
    expected_contributors: int
    max_epsilon: float = math.inf
    delta: float = 1e-5
    adaptive: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)

    mode: ClassVar[DPMode] = "central"

    def kwargs(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "expected_contributors": self.expected_contributors,
                "max_epsilon": self.max_epsilon, "delta": self.delta, "adaptive": self.adaptive,
                **self.options}

    def terms(self) -> DPTerms:
        return DPTerms(self.mode, float(self.noise_multiplier), float(self.clipping_norm),
                       self.adaptive is not None)


@dataclass(frozen=True)
class DistributedDP(CentralDP):
    """User-level DP whose noise the clients add under SecAgg+ (needs ``secagg``).

    Attributes:
        min_contributors: the clients whose noise the sum must hold (see
            :class:`flwr_guard.dp.DPFedAvg`; clients refuse more than they assume); the
            other fields as :class:`CentralDP`. The Skellam sensitivity's quantisation
            step is SecAgg+'s ``2 * clipping_range / quantization_range``, filled in by
            :class:`GuardedStrategy`.
    """

    min_contributors: int = 0

    mode: ClassVar[DPMode] = "distributed"

    def kwargs(self) -> dict[str, Any]:
        return {**super().kwargs(), "distributed": True, "min_contributors": self.min_contributors}


# Strategies that need every client's own update: under SecAgg+ they would get the one
# masked sum and silently turn into a mean (robust aggregation, per-client clipping,
# tree bagging, q-fair weights). flwr-guard's DPFedAvg replaces Flower's DP wrappers.
_NEEDS_EACH_UPDATE = ("Bulyan", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum",
                      "FedXgbBagging", "FedXgbCyclic", "QFedAvg")
_FLOWER_DP = ("DifferentialPrivacyClientSideAdaptiveClipping",
              "DifferentialPrivacyClientSideFixedClipping",
              "DifferentialPrivacyServerSideAdaptiveClipping",
              "DifferentialPrivacyServerSideFixedClipping")


def _unsupported(strategy: Strategy, secagg: bool) -> str | None:
    """Why ``strategy`` (or one it wraps) cannot run inside this chain, or ``None``."""
    from flwr_guard.telemetry.strategy import strategy_chain

    for s in strategy_chain(strategy):
        names = {cls.__name__ for cls in type(s).__mro__ if cls.__module__.startswith("flwr.")}
        flower_dp = names & set(_FLOWER_DP)
        if flower_dp:
            return (f"{type(s).__name__} is Flower's own DP wrapper: use dp=CentralDP(...) or "
                    "DistributedDP(...) of GuardedStrategy instead (its accounting and budget "
                    "are the ones the clients' policies check)")
        needs = names & set(_NEEDS_EACH_UPDATE)
        if secagg and needs:
            return (f"{type(s).__name__} aggregates each client's own update ({sorted(needs)[0]}), "
                    "but under SecAgg+ the server sees only their sum: it would silently become "
                    "a mean. Use a mean-based strategy (FedAvg, FedProx, FedAvgM, FedAdam, "
                    "FedAdagrad, FedYogi) with secagg, or drop secagg")
    return None


def _already_guarded(strategy: Strategy) -> str | None:
    from flwr_guard.telemetry.strategy import strategy_chain

    protections = {"SecAggPlus", "DPFedAvg", "ReplyGuard", "AuditSummary", "TelemetryStrategy",
                   "GuardedStrategy"}
    for s in strategy_chain(strategy):
        if isinstance(s, StrategyWrapper) and protections & {c.__name__ for c in type(s).__mro__}:
            return type(s).__name__
    return None


class GuardedStrategy(StrategyWrapper):
    """The server's protections, declared once (see the module docstring).

    Args:
        strategy: the user's bare strategy (not already wrapped by flwr-guard).
        secagg: :class:`SecAgg`, or ``None`` for none.
        dp: :class:`CentralDP` or :class:`DistributedDP`, or ``None``.
        reply_guard: drop replies that carry more than the update.
        audit_summary: collect the clients' leakage-audit scores per round.
        telemetry: a ServerApp ``Context``: export Prometheus metrics as its run config
            says (:meth:`flwr_guard.telemetry.TelemetryStrategy.from_run_config`); or
            ``None``.
        observer: told each round's aggregated train and evaluate metrics as the chain
            returns them (:class:`RoundObserver`; e.g. a progress file for a dashboard).
        tolerate_refusals: go on however many clients refuse the server's protections
            (their replies are dropped, logged as errors). By default a round that a
            majority of the clients it asked refuse stops the run with
            :class:`GuardMismatch`: a server most of its federation refuses is a
            configuration error to fix, not a dropout; half or fewer are left out with an
            ERROR line each, so that one client claiming a refusal cannot end the run for
            the others.

    Attributes:
        manifest: the :class:`ProtectionManifest` sent with every train message.
        secagg, dp, audit, reply_guard, telemetry: the wrappers built (or ``None``).

    Raises:
        GuardConfigError: distributed DP without SecAgg+, adaptive clipping with
            distributed noise, a strategy already wrapped by flwr-guard or by Flower's DP
            wrappers, a strategy that needs each client's update under SecAgg+ (FedMedian,
            Krum, ...), a weighting SecAgg+ cannot sum, or parameters the clients' manifest
            parser refuses.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        secagg: SecAgg | None = None,
        dp: CentralDP | None = None,
        reply_guard: bool = True,
        audit_summary: bool = True,
        telemetry: Context | None = None,
        tolerate_refusals: bool = False,
        observer: RoundObserver | None = None,
    ) -> None:
        self.tolerate_refusals = tolerate_refusals
        self.observer = observer
        wrapped = _already_guarded(strategy)
        if wrapped is not None:
            raise GuardConfigError(
                f"pass the bare strategy: it is already wrapped in {wrapped}; GuardedStrategy "
                "builds flwr-guard's wrappers itself (or use the wrappers alone, not both)"
            )
        why = _unsupported(strategy, secagg is not None)
        if why is not None:
            raise GuardConfigError(why)
        if isinstance(dp, DistributedDP) and secagg is None:
            raise GuardConfigError(
                "DistributedDP adds the noise on the clients under SecAgg+: pass secagg=SecAgg() "
                "too, or use CentralDP"
            )
        if isinstance(dp, DistributedDP) and dp.adaptive is not None:
            raise GuardConfigError(
                "adaptive clipping with distributed noise would show the server the exact count "
                "of unclipped updates: use fixed clipping with DistributedDP"
            )
        chain: Strategy = strategy
        self.reply_guard = None
        if reply_guard:
            from flwr_guard.inspection.reply_guard import ReplyGuard

            chain = self.reply_guard = ReplyGuard(chain)
        self.dp = None
        if dp is not None:
            from flwr_guard.dp.strategy import DPFedAvg

            kwargs = dp.kwargs()
            if isinstance(dp, DistributedDP) and secagg is not None:
                kwargs.setdefault("quantization_step",
                                  2 * secagg.clipping_range / secagg.quantization_range)
            try:
                chain = self.dp = DPFedAvg(chain, **kwargs)
            except ValueError as err:
                raise GuardConfigError(str(err)) from None
        self.secagg = None
        if secagg is not None:
            from flwr_guard.secagg.strategy import SecAggPlus

            masked = tuple(secagg.options.get("masked_metrics", ()))
            if dp is not None:  # DPFedAvg's proofs of clipping and noise travel masked
                from flwr_guard.dp.strategy import DPFedAvg

                masked += tuple(k for k in DPFedAvg.MASKED_METRICS if k not in masked)
            options = {**secagg.options, "masked_metrics": masked}
            if dp is not None:
                # Under user-level DP every weight is 1 and DPFedAvg's masked metrics are
                # bits: max_weight 1 keeps the masked vector 32-bit up to 65 535 clients
                # (with the default 2048 a cohort of 100 doubles the upload).
                options.setdefault("max_weight", 1)
            try:
                chain = self.secagg = SecAggPlus(
                    chain, num_shares=secagg.num_shares,
                    reconstruction_threshold=secagg.reconstruction_threshold,
                    clipping_range=secagg.clipping_range,
                    quantization_range=secagg.quantization_range,
                    timeout=secagg.timeout, multi_round=secagg.multi_round, **options,
                )
            except ValueError as err:
                raise GuardConfigError(str(err)) from None
        self.audit = None
        if audit_summary:
            from flwr_guard.audit.summary import AuditSummary

            chain = self.audit = AuditSummary(chain)
        protections = [name for name, on in (
            ("secagg", secagg is not None),
            (f"{dp.mode}-dp" if dp is not None else "", dp is not None),
            ("update-clipping", dp is not None),
            ("reply-guard", reply_guard),
            ("audit-summary", audit_summary),
            ("telemetry", telemetry is not None),
        ) if on]
        try:
            self.manifest = ProtectionManifest(
                protections=tuple(protections),
                secagg=secagg.terms() if secagg is not None else None,
                dp=dp.terms() if dp is not None else None,
            )
            ProtectionManifest.parse(self.manifest.to_json())  # what every client will do
        except ManifestError as err:
            raise GuardConfigError(f"the clients could not accept these settings: {err}") from None
        self.telemetry = None
        if telemetry is not None:
            from flwr_guard.telemetry.strategy import TelemetryStrategy

            chain = self.telemetry = TelemetryStrategy.from_run_config(
                chain, telemetry, protections=self.manifest.protections,
                secagg=self.secagg, dp=self.dp, reply_guard=self.reply_guard)
        super().__init__(chain)
        self.aggregated_rounds = 0
        self.failures: dict[int, str] = {}
        self.reasons = RefusalLog()  # the clients' own reasons, stages included

    def summary(self) -> None:
        log(INFO, "flwr-guard protections (sent to every client as the protection manifest):")
        for line in self.manifest.describe():
            log(INFO, "\t├── %s", line)
        if not self.manifest.has("secagg"):
            log(INFO, "\t├── no SecAgg+: the server sees every client's update")
        if self.manifest.dp is None:
            log(INFO, "\t├── no user-level DP on the server")
        self.strategy.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """``Strategy.start`` with the manifest in every train config.

        Raises:
            GuardConfigError: ``train_config`` already holds the manifest key.
            GuardMismatch: a majority of a round's clients refused the server's protections.
            NoAggregate: no round produced an aggregate (each round's reason is given).
        """
        train_config = ConfigRecord(dict(train_config or {}))
        if MANIFEST_KEY in train_config:
            raise GuardConfigError(f"{MANIFEST_KEY!r} is reserved for the protection manifest")
        train_config[MANIFEST_KEY] = self.manifest.to_json()
        self.aggregated_rounds, self.failures = 0, {}
        grid = self.reasons.watch(grid)
        session = (self.telemetry.session(grid, num_rounds, evaluate_fn)
                   if self.telemetry is not None else nullcontext(evaluate_fn))
        with session as evaluate:
            result = super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                                   evaluate_config, evaluate)
        if num_rounds > 0 and self.aggregated_rounds == 0:
            reasons = "; ".join(f"round {r}: {why}" for r, why in sorted(self.failures.items()))
            raise NoAggregate(
                f"no round of {num_rounds} produced an aggregate, the model was never updated "
                f"({reasons or 'no reason recorded'})"
            )
        return result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate, then log the round; stop the run when a majority of the clients the
        round asked refused the server's protections.

        Raises:
            GuardMismatch: a majority of the round's clients refused (a policy refusal, a
                missing ledger, a SecAgg+ set-up refusal), unless ``tolerate_refusals``.
        """
        replies = self._aggregatable(server_round, list(replies), train=True)
        refusals = self.reasons.refusals(replies)
        for node, reason in refusals.items():
            log(ERROR, "flwr-guard round %s: node %s refused: %s", server_round, node, reason)
        asked = self.reasons.round_asked
        if refusals and not self.tolerate_refusals and refusals_stop_run(
                server_round, refusals, replies, self.secagg, asked):
            raise GuardMismatch(mismatch_message(server_round, refusals, replies, self.secagg,
                                                 self.reasons.last, asked))
        arrays, metrics = self._inner_aggregate_train(server_round, replies)
        if arrays is not None:
            self.aggregated_rounds += 1
        else:
            self.failures[server_round] = failure_reason(
                server_round, replies, secagg=self.secagg, dp=self.dp, refusals=self.reasons.last)
        log(INFO if arrays is not None else WARNING, "flwr-guard round %s: %s", server_round,
            describe_round(server_round, replies, arrays is not None,
                           secagg=self.secagg, dp=self.dp, audit=self.audit,
                           refusals=self.reasons.last))
        if self.observer is not None:
            self.observer.train_aggregated(server_round, replies, metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._aggregatable(server_round, list(replies), train=False)
        try:
            metrics = self.strategy.aggregate_evaluate(server_round, replies)
        except InconsistentMessageReplies as err:
            log(ERROR, "flwr-guard round %s: evaluate replies not aggregated: %s", server_round,
                err)
            metrics = None
        if self.observer is not None:
            self.observer.evaluate_aggregated(server_round, metrics)
        return metrics

    # -- one client's odd reply never ends the run (issue 20) ---------------------------
    def _aggregatable(self, server_round: int, replies: list[Message], train: bool) -> list[Message]:
        """The replies the wrapped chain can aggregate together: Flower's per-reply
        consistency checks applied first (:func:`~flwr_guard.guard.reply_consistency.
        consistent_replies`), each odd reply left out with a logged reason. Under SecAgg+
        train replies go to :class:`~flwr_guard.secagg.SecAggPlus` as they are (it parses
        and excludes each client itself and hands Flower one synthetic reply)."""
        if train and self.secagg is not None:
            return replies
        kept, excluded = consistent_replies(
            replies, getattr(self.strategy, "weighted_by_key", "num-examples"), check_arrays=train)
        for node, reason in sorted(excluded.items()):
            log(WARNING, "flwr-guard round %s: %s reply of node %s left out: %s", server_round,
                "train" if train else "evaluate", node, reason)
        return kept

    def _inner_aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The chain's ``aggregate_train``; Flower's ``InconsistentMessageReplies`` (which
        :meth:`_aggregatable` should have prevented) fails this round, not the run."""
        try:
            return self.strategy.aggregate_train(server_round, replies)
        except InconsistentMessageReplies as err:
            log(ERROR, "flwr-guard round %s: replies not aggregated: %s", server_round, err)
            return None, None
