"""Server-side summary of the leakage audits that arrive in train replies.

FedAvg averages every metric weighted by ``num-examples``, which turns the clients'
``audit-*`` scores into meaningless numbers (audited and unaudited replies mixed). This
wrapper reads the replies before the wrapped strategy does and replaces the ``audit-*``
keys of the aggregated MetricRecord with the round's worst case:

| key | value for the round |
| --- | --- |
| ``audit-ran`` | number of replies that carry an audit |
| ``audit-leaks`` | number of those whose verdict is "leaks" |
| ``audit-blocked`` | replies blocked by the audit gate (error replies) |
| ``audit-error`` | audits that failed on the client |
| ``audit-psnr-db``, ``audit-psnr-gain-db``, ``audit-ssim``, ``audit-identified-rate``, ``audit-label-accuracy``, ``audit-seconds`` | maximum over the audits |
| ``audit-cosine``, ``audit-recovered-fraction``, ``audit-token-f1`` | maximum over the audits |
| ``audit-rel-l2-error`` | minimum over the audits (the closest reconstruction) |
| ``audit-baseline-psnr-db`` | mean over the audits |

Scores that do not apply to the app's inputs (NaN in the replies: SSIM of a vector,
PSNR of tokens) are left out of the maximum; with no value at all the key is NaN.

The keys appear only when an audit is configured: when no reply of the round carries
``audit-ran`` and none was blocked by the gate, the aggregated metrics get no
``audit-*`` key at all (a strategy without clients' audits exports no audit metrics).

Usage: ``AuditSummary(FedAvg(...))``; :meth:`AuditSummary.worst` gives the worst round
of the run (for a demo summary or a dashboard).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from flwr_guard.audit.audit_mod import AUDIT_FAILED, BLOCKED_REASON
from flwr_guard.config_values import number
from flwr_guard.keys import ReplyMetrics, ServerMetrics
from flwr_guard.records import find_metric_record
from flwr_guard.strategy_wrapper import StrategyWrapper

logger = logging.getLogger(__name__)

_MAX_KEYS = (ReplyMetrics.AUDIT_PSNR_DB, ReplyMetrics.AUDIT_PSNR_GAIN_DB, ReplyMetrics.AUDIT_SSIM,
             ReplyMetrics.AUDIT_IDENTIFIED_RATE, ReplyMetrics.AUDIT_LABEL_ACCURACY,
             ReplyMetrics.AUDIT_SECONDS, ReplyMetrics.AUDIT_COSINE,
             ReplyMetrics.AUDIT_RECOVERED_FRACTION, ReplyMetrics.AUDIT_TOKEN_F1)
_MIN_KEYS = (ReplyMetrics.AUDIT_REL_L2_ERROR,)


def _audit_scores(record: Any) -> dict[str, float]:
    """The audit metrics of one reply as numbers: every ``audit-*`` value a finite-or-NaN
    number (NaN marks a score that does not apply), the counts (ran, leaks, error)
    finite and >= 0.

    Raises:
        TypeError: a value that is not a number (a list, a string).
        ValueError: a count that is negative, infinite or NaN.
    """
    scores: dict[str, float] = {}
    for key, value in record.items():
        if not str(key).startswith(ReplyMetrics.AUDIT_PREFIX):
            continue
        scores[key] = number(value, key)
    for key in (ReplyMetrics.AUDIT_RAN, ReplyMetrics.AUDIT_LEAKS, ReplyMetrics.AUDIT_ERROR):
        if key in scores and not (math.isfinite(scores[key]) and scores[key] >= 0):
            raise ValueError(f"{key} must be a finite count >= 0, got {scores[key]}")
    return scores


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def summarise_replies(replies: list[Message]) -> dict[str, float | int]:
    """The round's audit summary (the keys of the module's table) from its replies;
    ``{}`` when no reply carries an audit key and none was blocked or refused by one
    (no audit configured)."""
    audited: list[dict[str, Any]] = []
    blocked = errors = 0
    configured = False
    for reply in replies:
        if reply.has_error():
            reason = reply.error.reason or ""
            blocked += reason.startswith(BLOCKED_REASON)
            failed = AUDIT_FAILED in reason
            errors += failed
            configured = configured or failed or reason.startswith(BLOCKED_REASON)
            continue
        record = find_metric_record(reply.content)
        if record is None:
            continue
        if ReplyMetrics.AUDIT_RAN in record:
            configured = True
        try:
            scores = _audit_scores(record)
        except (TypeError, ValueError, OverflowError) as err:  # one client's odd metrics
            logger.warning("AuditSummary: audit metrics of node %s left out: %s",
                           reply.metadata.src_node_id, err)
            errors += 1
            continue
        errors += int(scores.pop(ReplyMetrics.AUDIT_ERROR, 0))
        if scores.get(ReplyMetrics.AUDIT_RAN, 0):
            audited.append(scores)
    if not configured:
        return {}
    out: dict[str, float | int] = {
        ReplyMetrics.AUDIT_RAN: len(audited),
        ReplyMetrics.AUDIT_LEAKS: sum(int(a.get(ReplyMetrics.AUDIT_LEAKS, 0)) for a in audited),
        ServerMetrics.AUDIT_BLOCKED: blocked,
        ReplyMetrics.AUDIT_ERROR: errors,
    }
    for keys, pick in ((_MAX_KEYS, max), (_MIN_KEYS, min)):
        for name in keys:
            values = _finite([float(a[name]) for a in audited if name in a])
            out[name] = pick(values) if values else (math.nan if audited else 0.0)
    base = _finite([float(a[ReplyMetrics.AUDIT_BASELINE_PSNR_DB]) for a in audited
                    if ReplyMetrics.AUDIT_BASELINE_PSNR_DB in a])
    out[ReplyMetrics.AUDIT_BASELINE_PSNR_DB] = sum(base) / len(base) if base else (
        math.nan if audited else 0.0)
    return out


class AuditSummary(StrategyWrapper):
    """Put the round's worst-case audit scores into the aggregated train metrics.

    Attributes:
        rounds: ``{server_round: summary}`` for every round aggregated.
    """

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        self.rounds: dict[int, dict[str, float | int]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        summary = summarise_replies(replies)
        self.rounds[server_round] = summary
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if not summary:
            return arrays, metrics
        metrics = MetricRecord() if metrics is None else metrics
        for key in [k for k in metrics if k.startswith(ReplyMetrics.AUDIT_PREFIX)]:
            del metrics[key]
        for key, value in summary.items():
            metrics[key] = value
        return arrays, metrics

    def worst(self) -> dict[str, Any] | None:
        """The round with the highest ``audit-psnr-gain-db`` among audited rounds, as
        ``{"round": r, **summary}``; ``None`` if no audit ran."""
        audited = {r: s for r, s in self.rounds.items() if s.get(ReplyMetrics.AUDIT_RAN)}
        if not audited:
            return None
        def gain(r: int) -> float:
            value = float(audited[r][ReplyMetrics.AUDIT_PSNR_GAIN_DB])
            return value if math.isfinite(value) else float(audited[r][ReplyMetrics.AUDIT_LEAKS])

        rnd = max(audited, key=gain)
        return {"round": rnd, **audited[rnd]}
