"""Turn what one federated round did into metric updates (pure core, no Flower).

:class:`TelemetryRecorder` is fed plain Python values — the SecAgg+ round report as a
dict, the DP wrapper's state, each train reply's metrics as a mapping — by the Flower
adapter (:class:`~flwr_guard.telemetry.strategy.TelemetryStrategy`), and sets the
families of :class:`~flwr_guard.telemetry.metrics.GuardMetrics`. Anything missing
(no SecAgg+, no DP, no audit) leaves the corresponding families untouched: a family
that is never set is never exported, rather than exported as a misleading zero.

Client statistics — update norms and clipping bits of individual clients, which the
server holds in the clear only without secure aggregation (the bits also with it) —
are exported only with ``client_statistics=True``: they are functions of one client's
data, and a DP guarantee covers the released model, not a metrics endpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr_guard.telemetry import keys
from flwr_guard.telemetry.keys import lookup
from flwr_guard.telemetry.metrics import GuardMetrics
from flwr_guard.telemetry.robustness import record_robustness

OUTCOMES = ("aggregated", "failed", "skipped")


@dataclass(frozen=True)
class ReplyView:
    """What telemetry reads from one train reply.

    Attributes:
        node: the replying node's id (used only for per-node families).
        ok: whether the reply is a result (not an error).
        metrics: its MetricRecord as a mapping (empty for an error).
        update_norm: L2 norm of ``reply arrays - global arrays`` when the server sees
            them in the clear and client statistics are on; else ``None``.
        error: the error reason of an error reply (``""`` otherwise).
    """

    node: int
    ok: bool
    metrics: Mapping[str, Any]
    update_norm: float | None = None
    error: str = ""


@dataclass(frozen=True)
class DPState:
    """User-level DP state read from the DP wrapper after a round.

    Attributes:
        epsilon: epsilon spent so far at ``delta``.
        max_epsilon: the budget (``inf`` = none).
        delta: target delta.
        noise_multiplier: ``z``.
        clipping_norm: ``C`` the clients used in the round (``None``: unknown).
        noise_std: std of the noise added to the round's mean (``None``: unknown).
        exhausted: whether the budget stopped training.
        noised_unclipped_fraction: the DP-noised fraction of unclipped updates, if the
            wrapper reports one (adaptive clipping).
    """

    epsilon: float
    max_epsilon: float
    delta: float
    noise_multiplier: float
    clipping_norm: float | None = None
    noise_std: float | None = None
    exhausted: bool = False
    noised_unclipped_fraction: float | None = None


class TelemetryRecorder:
    """Metric updates for one run.

    Args:
        metrics: the families to set.
        run: value of the ``run`` label (Flower's run id).
        strategy: value of the ``strategy`` label (innermost strategy class name).
        client_statistics: export per-client update norms and clipping bits.
        record_epsilon_budget: record-level (DP-SGD) budget per client, if any.
        record_delta: delta of the record-level epsilon, if known (else read from
            replies under ``dp-sgd-delta``).
    """

    def __init__(
        self,
        metrics: GuardMetrics,
        run: str,
        strategy: str,
        *,
        client_statistics: bool = False,
        record_epsilon_budget: float | None = None,
        record_delta: float | None = None,
    ) -> None:
        self.metrics = metrics
        self.run = str(run)
        self.strategy = str(strategy)
        self.client_statistics = client_statistics
        self.record_epsilon_budget = record_epsilon_budget
        self.record_delta = record_delta
        self._started: dict[int, float] = {}
        self._worst: dict[str, float] = {}
        self._record_epsilon: float | None = None
        self._labels("round").set(0)

    # -- helpers -------------------------------------------------------------------
    def _labels(self, family: str, **extra: str) -> Any:
        return self.metrics[family].labels(run=self.run, strategy=self.strategy, **extra)

    def _worst_gauge(self, family: str, value: float) -> None:
        if value > self._worst.get(family, -math.inf):
            self._worst[family] = value
            self._labels(family).set(value)

    # -- run -----------------------------------------------------------------------
    def run_info(self, chain: Sequence[str], protections: Iterable[str]) -> None:
        """Publish ``flwr_guard_run_info`` (strategy chain, protections in force)."""
        self._labels("run").info(
            {"chain": ">".join(chain), "protections": ",".join(sorted(protections)) or "none"}
        )

    def run_started(self, num_rounds: int) -> None:
        """The run starts ``num_rounds`` rounds (``flwr_guard_rounds_planned``)."""
        self._labels("rounds_planned").set(num_rounds)

    def round_started(self, server_round: int) -> None:
        self._started[server_round] = time.monotonic()

    def round_finished(self, server_round: int, outcome: str, sampled: int, replied: int) -> None:
        """Close a training round: outcome, cohort, replies, duration."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self._labels("rounds", outcome=outcome).inc()
        self._labels("round").set(server_round)
        self._labels("clients_sampled").inc(sampled)
        self._labels("clients_replied").inc(replied)
        self._labels("round_clients_sampled").set(sampled)
        self._labels("round_clients_replied").set(replied)
        started = self._started.pop(server_round, None)
        if started is not None:
            self._labels("round_duration_seconds").observe(time.monotonic() - started)

    # -- training progress -----------------------------------------------------------
    def progress(self, phase: str, record: Mapping[str, Any] | None) -> None:
        """Loss and accuracy of ``phase`` (``train``, ``evaluate`` or ``server``)."""
        loss = lookup(record, keys.LOSS[phase])
        if loss is not None:
            self._labels("loss", phase=phase).set(loss)
        if phase in keys.ACCURACY:
            accuracy = lookup(record, keys.ACCURACY[phase])
            if accuracy is not None:
                self._labels("accuracy_ratio", phase=phase).set(accuracy)
        record_robustness(self, phase, record)  # robustness families (telemetry/robustness.py)

    # -- SecAgg+ -----------------------------------------------------------------------
    def secagg_round(self, report: Mapping[str, Any]) -> None:
        """One SecAgg+ round report (``RoundReport.to_dict()``)."""
        for stage, count in (report.get("dropouts") or {}).items():
            self._labels("secagg_dropouts", stage=stage).inc(max(int(count), 0))
        for stage, seconds in (report.get("stage_seconds") or {}).items():
            self._labels("secagg_stage_duration_seconds", stage=stage).observe(float(seconds))
        for stage, size in (report.get("bytes_to_clients") or {}).items():
            self._labels("secagg_sent_bytes", stage=stage).inc(max(int(size), 0))
        for stage, size in (report.get("bytes_from_clients") or {}).items():
            self._labels("secagg_received_bytes", stage=stage).inc(max(int(size), 0))
        aborted = self._labels("secagg_aborted_rounds")  # exported from the first round on
        if report.get("aborted"):
            aborted.inc()
        self._labels("secagg_cohort_clients").set(int(report.get("cohort", 0)))
        self._labels("secagg_surviving_clients").set(
            0 if report.get("aborted") else int(report.get("survivors", 0))
        )
        for field, family in (("reconstruction_threshold", "secagg_reconstruction_threshold"),
                              ("num_shares", "secagg_num_shares")):
            if report.get(field):
                self._labels(family).set(int(report[field]))
        self._labels("secagg_clipped_values").inc(max(int(report.get("clipped_values", 0)), 0))
        setups = self._labels("secagg_key_setups")  # exported from the first round on
        if report.get("key_setup", True):
            setups.inc()
        # SecAgg+ picks its modulus so that the weighted sum cannot wrap (SecAggParams);
        # a report that counts wrap-arounds (distributed DP noise) adds them.
        self._labels("modular_wraparounds").inc(max(int(report.get("wraparounds", 0) or 0), 0))

    def wraparounds(self, count: float) -> None:
        self._labels("modular_wraparounds").inc(max(count, 0.0))

    # -- DP ----------------------------------------------------------------------------
    def dp_state(self, state: DPState) -> None:
        """User-level DP: epsilon against the budget, noise and clipping parameters."""
        self._labels("dp_epsilon", level="user").set(state.epsilon)
        self._labels("dp_epsilon_budget", level="user").set(state.max_epsilon)
        self._labels("dp_delta", level="user").set(state.delta)
        self._labels("dp_noise_multiplier").set(state.noise_multiplier)
        self._labels("dp_budget_exhausted").set(1.0 if state.exhausted else 0.0)
        if state.clipping_norm is not None:
            self._labels("dp_clipping_norm").set(state.clipping_norm)
        if state.noise_std is not None:
            self._labels("dp_noise_stddev").set(state.noise_std)
        if state.noised_unclipped_fraction is not None:
            fraction = min(max(1.0 - state.noised_unclipped_fraction, 0.0), 1.0)
            self._labels("clipped_updates_ratio").set(fraction)

    # -- client replies ----------------------------------------------------------------
    def replies(self, replies: Sequence[ReplyView]) -> None:
        """Per-reply client metrics: record-level epsilon, audit, inspector, statistics."""
        ok = [r for r in replies if r.ok]
        if self.metrics.per_node:
            for reply in replies:
                self._labels("node_train_replies", node=str(reply.node),
                             status="ok" if reply.ok else "error").inc()
        self._record_level(ok)
        self._audit(ok)
        blocked = sum(r.error.startswith(keys.BLOCKED_REASON_PREFIX) for r in replies)
        if blocked:
            self._labels("audit_blocked_updates").inc(blocked)
        failed = sum(keys.AUDIT_FAILED_MARK in r.error for r in replies)
        if failed:  # an audit that could not run and refused the update
            self._labels("audit_errors").inc(failed)
        violations = [lookup(r.metrics, keys.INSPECTOR_VIOLATIONS) for r in ok]
        refused = sum(r.error.startswith(keys.INSPECTOR_REASON_PREFIX) for r in replies)
        if refused or any(v is not None for v in violations):
            self._labels("inspector_violations").inc(
                refused + sum(max(v or 0.0, 0.0) for v in violations))
        if self.client_statistics:
            self._client_statistics(ok)

    def inspector_findings(self, count: int) -> None:
        """Findings of a server-side reply inspector (``ReplyGuard``) since the last call."""
        self._labels("inspector_violations").inc(max(count, 0))

    def _record_level(self, ok: Sequence[ReplyView]) -> None:
        epsilons = [(r, e) for r in ok if (e := lookup(r.metrics, keys.RECORD_EPSILON)) is not None]
        if not epsilons:
            return
        worst = max(e for _, e in epsilons)
        self._record_epsilon = max(worst, self._record_epsilon or -math.inf)
        self._labels("dp_epsilon", level="record").set(self._record_epsilon)
        delta = self.record_delta
        if delta is None:
            delta = next((d for d in (lookup(r.metrics, keys.RECORD_DELTA) for r in ok)
                          if d is not None), None)
        if delta is not None:
            self._labels("dp_delta", level="record").set(delta)
        if self.record_epsilon_budget is not None:
            self._labels("dp_epsilon_budget", level="record").set(self.record_epsilon_budget)
        if self.metrics.per_node:
            for reply, epsilon in epsilons:
                self._labels("node_dp_record_epsilon", node=str(reply.node)).set(epsilon)

    def _audit(self, ok: Sequence[ReplyView]) -> None:
        for reply in ok:
            audited = lookup(reply.metrics, keys.AUDITED)
            if audited is None:
                continue  # no audit mod on this client
            # The audit is in force: its counters are exported from here on, zeros included.
            audits, leaks = self._labels("audits"), self._labels("audit_leak_verdicts")
            errors = self._labels("audit_errors")
            self._labels("audit_blocked_updates")
            if (lookup(reply.metrics, keys.AUDIT_ERROR) or 0.0) > 0:
                errors.inc()
            if audited <= 0:
                continue
            psnr = lookup(reply.metrics, keys.PSNR)
            audits.inc()
            if (lookup(reply.metrics, keys.LEAK) or 0.0) > 0:
                leaks.inc()
            gain = lookup(reply.metrics, keys.PSNR_GAIN)
            if gain is not None:
                self._worst_gauge("audit_worst_psnr_gain_decibels", gain)
            for key_set, histogram, worst in (
                (keys.PSNR, "audit_psnr_decibels", "audit_worst_psnr_decibels"),
                (keys.SSIM, "audit_ssim", "audit_worst_ssim"),
                (keys.IDENTIFICATION, "audit_identification_ratio",
                 "audit_worst_identification_ratio"),
            ):
                value = lookup(reply.metrics, key_set)
                if value is not None:
                    self._labels(histogram).observe(value)
                    self._worst_gauge(worst, value)
            if self.metrics.per_node and psnr is not None:
                self._labels("node_audit_psnr_decibels", node=str(reply.node)).set(psnr)

    def _client_statistics(self, ok: Sequence[ReplyView]) -> None:
        for reply in ok:
            if reply.update_norm is not None and math.isfinite(reply.update_norm):
                self._labels("update_l2_norm").observe(reply.update_norm)
        bits = [b for b in (lookup(r.metrics, keys.UNCLIPPED_BIT) for r in ok) if b is not None]
        if bits:
            unclipped = sum(min(max(b, 0.0), 1.0) for b in bits) / len(bits)
            self._labels("clipped_updates_ratio").set(1.0 - unclipped)
