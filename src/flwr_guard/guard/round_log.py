"""What :class:`~flwr_guard.guard.strategy.GuardedStrategy` says about each round.

One line per round in Flower's log: what protected the round (SecAgg+ survivors of the
cohort, epsilon spent of the budget, the leakage audit's verdict, replies refused by a
client's policy), and, for a round without an aggregate, why. The clients' policy
refusals are recognised by their reason's prefix
(:data:`~flwr_guard.guard.client_mod.POLICY_REFUSAL`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from flwr.app import Message

from flwr_guard.errors import FlwrGuardError
from flwr_guard.guard.client_mod import POLICY_REFUSAL
from flwr_guard.guard.refusal_reasons import abort_reason
from flwr_guard.keys import ReplyMetrics

if TYPE_CHECKING:  # the SecAgg+ wrapper imports Flower's server side: only for the types
    from flwr_guard.secagg.strategy import RoundReport, SecAggPlus


class GuardMismatch(FlwrGuardError, RuntimeError):
    """The clients refuse what the server's strategy runs (their policies say why)."""


def policy_refusals(replies: list[Message]) -> dict[int, str]:
    """``{node_id: reason}`` of the replies that are a client's policy refusal."""
    return {
        r.metadata.src_node_id: str(r.error.reason)
        for r in replies
        if r.has_error() and str(r.error.reason).startswith(POLICY_REFUSAL)
    }


def secagg_report(secagg: SecAggPlus | None, server_round: int) -> RoundReport | None:
    """The SecAgg+ wrapper's :class:`~flwr_guard.secagg.strategy.RoundReport` of
    ``server_round``, or ``None``."""
    if secagg is None:
        return None
    reports = [r for r in secagg.history if r.server_round == server_round]
    return reports[-1] if reports else None


def failure_reason(server_round: int, replies: list[Message], *, secagg: SecAggPlus | None = None,
                   dp: Any = None, refusals: dict[int, str] | None = None) -> str:
    """Why ``server_round`` produced no aggregate, in one sentence (with the clients'
    own reasons when they gave any: :mod:`flwr_guard.guard.refusal_reasons`)."""
    report = secagg_report(secagg, server_round)
    if report is not None and report.aborted:
        return abort_reason(report.aborted, refusals or {})
    if dp is not None and getattr(dp, "stopped_reason", None):
        return str(dp.stopped_reason)
    if not replies:
        return "no replies (no client sampled, or none answered in time)"
    errors = [str(r.error.reason) for r in replies if r.has_error()]
    if errors:
        return f"{len(errors)} of {len(replies)} replies were errors, e.g. {errors[0]!r}"
    return "the strategy produced no aggregate"


def describe_round(server_round: int, replies: list[Message], aggregated: bool, *,
                   secagg: SecAggPlus | None = None, dp: Any = None, audit: Any = None,
                   refusals: dict[int, str] | None = None) -> str:
    """The round's line for Flower's log (see the module docstring)."""
    parts = []
    report = secagg_report(secagg, server_round)
    if report is not None and not report.aborted:
        parts.append(
            f"SecAgg+ summed {report.survivors} of {report.cohort} sampled clients "
            f"(k={report.num_shares}, t={report.reconstruction_threshold}; the one result "
            "Flower counts is that masked sum)"
        )
    elif report is None:
        errors = sum(1 for r in replies if r.has_error())
        parts.append(f"{len(replies) - errors} updates, {errors} failures")
    if dp is not None:
        budget = dp.budget
        limit = "" if math.isinf(budget.max_epsilon) else f" of {budget.max_epsilon:g}"
        parts.append(f"user-level epsilon {budget.epsilon_spent:.3g}{limit} at delta {budget.delta:g}")
    if audit is not None:
        summary = audit.rounds.get(server_round) or {}
        errors = int(summary.get(ReplyMetrics.AUDIT_ERROR, 0) or 0)
        if summary.get(ReplyMetrics.AUDIT_RAN) or errors:
            parts.append(f"audit: {int(summary.get(ReplyMetrics.AUDIT_LEAKS, 0))} of "
                         f"{int(summary.get(ReplyMetrics.AUDIT_RAN, 0))} audited updates leak"
                         + (f", {errors} audit error(s)" if errors else ""))
    refused = refusals if refusals is not None else policy_refusals(replies)
    if refused:
        parts.append(f"{len(refused)} client(s) refused by their policy")
    if not aggregated:
        parts.append("no aggregate, the model is unchanged: "
                     + failure_reason(server_round, replies, secagg=secagg, dp=dp,
                                      refusals=refusals))
    return "; ".join(parts)
