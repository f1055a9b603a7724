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

The SecAgg+ and DP wrappers are found by walking ``.strategy`` down the chain and are
recognised by what they expose (SecAgg+: a ``history`` of round reports; DP: a
``budget`` with ``epsilon_spent``), so a chain without them, or a later version that
drops a field, only leaves those families unset. A failure inside telemetry is logged
and never reaches the round: monitoring must not stop training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

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

logger = logging.getLogger(__name__)


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and every strategy it wraps (``.strategy``), outermost first."""
    chain, seen = [], set()
    current: Any = strategy
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = vars(current).get("strategy")  # not getattr: wrappers delegate lookups
    return chain


def _is_secagg(strategy: Strategy) -> bool:
    return isinstance(vars(strategy).get("history"), list) and hasattr(strategy, "num_shares")


def _is_reply_guard(strategy: Strategy) -> bool:
    return isinstance(vars(strategy).get("findings"), dict) and hasattr(strategy, "policy")


def _is_dp(strategy: Strategy) -> bool:
    budget = vars(strategy).get("budget")
    return budget is not None and hasattr(budget, "epsilon_spent") and hasattr(
        strategy, "noise_multiplier"
    )


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
    ) -> None:
        super().__init__(strategy)
        self.protections = None if protections is None else tuple(protections)
        self.metrics = metrics if metrics is not None else GuardMetrics()
        self.exporter = exporter
        self.pushgateway = pushgateway
        self.linger_s = float(linger_s)
        chain = strategy_chain(strategy)
        self.chain = [type(s).__name__ for s in chain]
        self.secagg = next((s for s in chain if _is_secagg(s)), None)
        self.dp = next((s for s in chain if _is_dp(s)), None)
        self.reply_guard = next((s for s in chain if _is_reply_guard(s)), None)
        self._findings_seen = 0
        self.client_statistics = self.dp is None if client_statistics is None else client_statistics
        self._run = run
        self._recorder_args = {
            "client_statistics": self.client_statistics,
            "record_epsilon_budget": record_epsilon_budget,
            "record_delta": record_delta,
        }
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
        recorder = TelemetryRecorder(self.metrics, run, self.chain[-1], **self._recorder_args)
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
        total = sum(len(found) for found in vars(self.reply_guard)["findings"].values())
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
            if getattr(report, "server_round", None) == server_round:
                return report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
        return None

    def _dp_state(self, aggregated: Mapping[str, Any]) -> DPState:
        dp: Any = self.dp
        budget = dp.budget
        clipping = lookup(aggregated, keys.CLIPPING_NORM)
        return DPState(
            epsilon=float(budget.epsilon_spent),
            max_epsilon=float(getattr(budget, "max_epsilon", math.inf)),
            delta=float(getattr(budget, "delta", math.nan)),
            noise_multiplier=float(dp.noise_multiplier),
            clipping_norm=clipping if clipping is not None else getattr(dp, "clipping_norm", None),
            noise_std=lookup(aggregated, keys.NOISE_STD),
            exhausted=getattr(dp, "stopped_reason", None) is not None,
            noised_unclipped_fraction=lookup(aggregated, keys.NOISED_UNCLIPPED_FRACTION),
        )
