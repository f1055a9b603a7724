"""Flower adapter: ``TelemetryStrategy`` records every round of the strategy it wraps.

Place it outermost, around the protections::

    strategy = TelemetryStrategy.from_run_config(
        SecAggPlus(DPFedAvg(FedAvg(...), ...), ...), context)
    result = strategy.start(grid, initial_arrays, num_rounds=..., evaluate_fn=...)

It changes nothing the wrapped strategy does (every call is delegated with the same
arguments and its results returned unchanged); around each call it reads:

- ``configure_train``: the cohort (the messages sent), the round's start time;
- ``aggregate_train``: each reply's MetricRecord *before* delegating (the DP wrapper
  rewrites replies in place, and SecAgg+ hands the inner strategy one synthetic
  reply): DP-SGD record-level epsilon, audit scores, inspector violations, and — with
  client statistics on and no secure aggregation — each update's L2 norm; then, after
  delegating, the SecAgg+ wrapper's round report (``history``), the DP wrapper's
  budget and parameters, the server-side reply inspector's findings (``ReplyGuard``),
  and the aggregated train metrics;
- ``aggregate_evaluate``: the aggregated evaluate metrics;
- ``evaluate_fn`` (wrapped by :meth:`start`): the server-side evaluation.

The SecAgg+, DP and reply-inspection wrappers are passed in (``secagg=``, ``dp=``,
``reply_guard=``; :class:`~flwr_guard.guard.strategy.GuardedStrategy` passes the ones it
built) or, when not passed, found by walking ``.strategy`` down the chain and matching
their classes (:class:`~flwr_guard.secagg.strategy.SecAggPlus`,
:class:`~flwr_guard.dp.strategy.DPFedAvg`, :class:`~flwr_guard.inspection.reply_guard.ReplyGuard`).
Their fields are read with their declared types, so renaming one is a type error, not
an empty dashboard. A failure inside telemetry is logged and never reaches the round:
monitoring must not stop training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_guard.strategy_wrapper import StrategyWrapper
from flwr_guard.telemetry import keys
from flwr_guard.telemetry.config import TelemetryConfig
from flwr_guard.telemetry.exporter import MetricsExporter
from flwr_guard.telemetry.keys import lookup
from flwr_guard.telemetry.metrics import GuardMetrics
from flwr_guard.telemetry.pushgateway import Pushgateway
from flwr_guard.telemetry.recorder import DPState, ReplyView, TelemetryRecorder
from flwr_guard.update import model_update, update_norm

if TYPE_CHECKING:
    from flwr_guard.dp.strategy import DPFedAvg
    from flwr_guard.inspection.reply_guard import ReplyGuard
    from flwr_guard.secagg.strategy import SecAggPlus

logger = logging.getLogger(__name__)
_W = TypeVar("_W", bound=Strategy)


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and every strategy it wraps (``.strategy``), outermost first."""
    chain, seen = [], set()
    current: Any = strategy
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = vars(current).get("strategy")  # not getattr: wrappers delegate lookups
    return chain


def _find(chain: Sequence[Strategy], cls: type[_W]) -> _W | None:
    return next((s for s in chain if isinstance(s, cls)), None)


class TelemetryStrategy(StrategyWrapper):
    """Export Prometheus metrics of every round of ``strategy`` (see the module docstring).

    Args:
        strategy: the strategy chain to observe (protections inside).
        metrics: the metric families; ``None`` = a new dedicated registry.
        run: value of the ``run`` label; ``None`` = the grid's run id at the first round.
        exporter: an HTTP exporter of ``metrics.registry`` to stop when the run ends
            (after ``linger_s``); ``None`` = none (e.g. you serve the registry yourself).
        pushgateway: push the registry after each round and at the end; ``None`` = no.
        client_statistics: export per-client update norms and clipping bits; ``None`` =
            on unless a DP wrapper is in the chain (the DP guarantee covers the model,
            not a metrics endpoint; see docs/metrics.md).
        record_epsilon_budget: record-level (DP-SGD) budget to show, if any.
        record_delta: delta of the record-level epsilon, if known.
        linger_s: seconds to keep the exporter up after the run.
        protections: the ``protections`` label of ``flwr_guard_run_info``; ``None`` =
            read off the chain (SecAgg+, DP, reply inspection).
            :class:`~flwr_guard.guard.strategy.GuardedStrategy` passes its manifest's list.
        secagg, dp, reply_guard: the SecAgg+, DP and server-side reply-inspection
            wrappers in ``strategy``'s chain; ``None`` = the first of that class in the
            chain, if any.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        metrics: GuardMetrics | None = None,
        run: str | None = None,
        exporter: MetricsExporter | None = None,
        pushgateway: Pushgateway | None = None,
        client_statistics: bool | None = None,
        record_epsilon_budget: float | None = None,
        record_delta: float | None = None,
        linger_s: float = 0.0,
        protections: Sequence[str] | None = None,
        secagg: SecAggPlus | None = None,
        dp: DPFedAvg | None = None,
        reply_guard: ReplyGuard | None = None,
    ) -> None:
        from flwr_guard.dp.strategy import DPFedAvg
        from flwr_guard.inspection.reply_guard import ReplyGuard
        from flwr_guard.secagg.strategy import SecAggPlus

        super().__init__(strategy)
        self.protections = None if protections is None else tuple(protections)
        self.metrics = metrics if metrics is not None else GuardMetrics()
        self.exporter = exporter
        self.pushgateway = pushgateway
        self.linger_s = float(linger_s)
        chain = strategy_chain(strategy)
        self.chain = [type(s).__name__ for s in chain]
        for name, given, cls in (("secagg", secagg, SecAggPlus), ("dp", dp, DPFedAvg),
                                 ("reply_guard", reply_guard, ReplyGuard)):
            if given is not None and not (isinstance(given, cls) and any(s is given for s in chain)):
                raise ValueError(f"{name}= must be a {cls.__name__} in the wrapped chain {self.chain}")
        self.secagg: SecAggPlus | None = secagg if secagg is not None else _find(chain, SecAggPlus)
        self.dp: DPFedAvg | None = dp if dp is not None else _find(chain, DPFedAvg)
        self.reply_guard: ReplyGuard | None = (
            reply_guard if reply_guard is not None else _find(chain, ReplyGuard))
        self._findings_seen = 0
        self.client_statistics = self.dp is None if client_statistics is None else client_statistics
        self._run = run
        self._record_epsilon_budget = record_epsilon_budget
        self._record_delta = record_delta
        self.recorder: TelemetryRecorder | None = None
        self.errors = 0
        self._sent: dict[int, int] = {}
        self._global: dict[str, np.ndarray] | None = None
        if run is not None:
            self._make_recorder(run)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_run_config(
        cls, strategy: Strategy, context: Context, environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> TelemetryStrategy:
        """Build from the run config (keys in :mod:`flwr_guard.telemetry.config`), start
        the exporter and set up the Pushgateway.

        An exporter that cannot bind its address is logged as an error and the run goes
        on without it (a metrics port must not cost a training run).

        Raises:
            ValueError: for invalid telemetry keys in the run config.
        """
        config = TelemetryConfig.from_run_config(context.run_config, environ)
        run = str(context.run_id)
        metrics = GuardMetrics(per_node=config.per_node)
        exporter = None
        if config.enabled:
            exporter = MetricsExporter(metrics.registry, config.address)
            try:
                exporter.start()
            except OSError as err:
                logger.error("flwr-guard telemetry: %s; the run goes on without an exporter", err)
                exporter = None
        pushgateway = Pushgateway(config.pushgateway_url, run) if config.pushgateway_url else None
        return cls(
            strategy, metrics=metrics, run=run, exporter=exporter, pushgateway=pushgateway,
            client_statistics=config.client_statistics,
            record_epsilon_budget=config.record_epsilon_budget,
            record_delta=config.record_delta, linger_s=config.linger_s, **kwargs,
        )

    def _make_recorder(self, run: str) -> TelemetryRecorder:
        recorder = TelemetryRecorder(
            self.metrics, run, self.chain[-1], client_statistics=self.client_statistics,
            record_epsilon_budget=self._record_epsilon_budget, record_delta=self._record_delta)
        if self.protections is not None:
            protections = list(self.protections)
        else:
            found = (("secagg", self.secagg), ("dp", self.dp), ("reply-inspection", self.reply_guard))
            protections = [name for name, wrapper in found if wrapper is not None]
        recorder.run_info(self.chain, protections)
        self.recorder = recorder
        return recorder

    def _recorder_for(self, grid: Grid) -> TelemetryRecorder:
        if self.recorder is None:
            self._make_recorder(str(grid.run.run_id))
        assert self.recorder is not None
        return self.recorder

    def _safe(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            self.errors += 1
            logger.exception("flwr-guard telemetry failed in %s; training goes on",
                             getattr(fn, "__name__", fn))
            return None

    # -- Strategy ---------------------------------------------------------------------
    def summary(self) -> None:
        where = self.exporter.url if self.exporter is not None else "no exporter"
        logger.info("flwr-guard telemetry (%s%s) around:", where,
                    f", push to {self.pushgateway.url}" if self.pushgateway else "")
        self.strategy.summary()

    @contextmanager
    def session(
        self,
        grid: Grid,
        num_rounds: int,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Iterator[Callable[[int, ArrayRecord], MetricRecord | None] | None]:
        """The telemetry of one run around a round loop that an outer wrapper drives
        (:class:`~flwr_guard.guard.strategy.GuardedStrategy`): records the run's start,
        yields ``evaluate_fn`` wrapped so that the server-side evaluation is recorded, and
        :meth:`close` s at the end."""
        recorder = self._safe(self._recorder_for, grid)
        if recorder is not None:
            self._safe(recorder.run_started, num_rounds)
        wrapped = None
        if evaluate_fn is not None:
            def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                metrics = evaluate_fn(server_round, arrays)
                if self.recorder is not None:
                    self._safe(self.recorder.progress, "server", metrics)
                return metrics
        try:
            yield wrapped
        finally:
            self.close()

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
        """``Strategy.start`` with the server-side evaluation recorded; then :meth:`close`."""
        with self.session(grid, num_rounds, evaluate_fn) as wrapped:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                                 evaluate_config, wrapped)

    def close(self) -> None:
        """Push a last time, keep serving ``linger_s`` seconds, stop the exporter."""
        self.push()
        if self.exporter is not None:
            self.exporter.stop(self.linger_s)

    def push(self) -> None:
        if self.pushgateway is not None:
            self.pushgateway.push(self.metrics.registry)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        recorder = self._safe(self._recorder_for, grid)
        if recorder is not None:
            self._safe(recorder.round_started, server_round)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = len(messages)
        self._global = None
        if self.client_statistics and self.secagg is None and messages:
            self._global = self._safe(lambda: {k: v.numpy() for k, v in arrays.items()})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        views = self._safe(self._views, replies) or []  # before DP rewrites the replies
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self._safe(self._after_train, server_round, views, arrays, metrics)
        self.push()
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if self.recorder is not None:
            self._safe(self.recorder.progress, "evaluate", metrics)
            self._safe(self._inspector_findings)
        return metrics

    def _inspector_findings(self) -> None:
        """New findings of the server-side reply inspector since the last reading."""
        if self.reply_guard is None or self.recorder is None:
            return
        total = sum(len(found) for found in self.reply_guard.findings.values())
        self.recorder.inspector_findings(total - self._findings_seen)  # exported from 0 on
        self._findings_seen = total

    # -- reading the round -------------------------------------------------------------
    def _views(self, replies: list[Message]) -> list[ReplyView]:
        views = []
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                views.append(ReplyView(node, False, {}, error=str(reply.error.reason or "")))
                continue
            if not reply.has_content():
                views.append(ReplyView(node, False, {}))
                continue
            records = list(reply.content.metric_records.values())
            metrics = dict(records[0].items()) if len(records) == 1 else {}
            views.append(ReplyView(node, True, metrics, self._update_norm(reply)))
        return views

    def _update_norm(self, reply: Message) -> float | None:
        if self._global is None:
            return None
        records = list(reply.content.array_records.values())
        if len(records) != 1 or list(records[0].keys()) != list(self._global):
            return None
        try:
            return update_norm(model_update({k: v.numpy() for k, v in records[0].items()},
                                            self._global))
        except ValueError:
            return None

    def _after_train(
        self, server_round: int, views: list[ReplyView], arrays: ArrayRecord | None,
        metrics: MetricRecord | None,
    ) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        sent = self._sent.pop(server_round, 0)
        report = self._secagg_report(server_round)
        recorder.replies(views)
        if report is not None:
            recorder.secagg_round(report)
            sampled = int(report.get("cohort", 0))
            replied = 0 if report.get("aborted") else int(report.get("survivors", 0))
        else:
            sampled, replied = sent, sum(v.ok for v in views)
        aggregated = dict(metrics.items()) if metrics is not None else {}
        wraps = lookup(aggregated, keys.WRAPAROUNDS)
        if wraps is not None:
            recorder.wraparounds(wraps)
        if self.dp is not None:
            recorder.dp_state(self._dp_state(aggregated))
        recorder.progress("train", aggregated)
        self._inspector_findings()
        if arrays is not None:
            outcome = "aggregated"
        else:
            outcome = "skipped" if sampled == 0 else "failed"
        recorder.round_finished(server_round, outcome, sampled, replied)

    def _secagg_report(self, server_round: int) -> dict[str, Any] | None:
        if self.secagg is None:
            return None
        for report in reversed(self.secagg.history):
            if report.server_round == server_round:
                return report.to_dict()
        return None

    def _dp_state(self, aggregated: Mapping[str, Any]) -> DPState:
        dp = self.dp
        assert dp is not None  # called only with a DP wrapper in the chain
        budget = dp.budget
        clipping = lookup(aggregated, keys.CLIPPING_NORM)
        return DPState(
            epsilon=float(budget.epsilon_spent),
            max_epsilon=float(budget.max_epsilon),
            delta=float(budget.delta),
            noise_multiplier=float(dp.noise_multiplier),
            clipping_norm=clipping if clipping is not None else dp.clipping_norm,
            noise_std=lookup(aggregated, keys.NOISE_STD),
            exhausted=dp.stopped_reason is not None,
            noised_unclipped_fraction=lookup(aggregated, keys.NOISED_UNCLIPPED_FRACTION),
        )
