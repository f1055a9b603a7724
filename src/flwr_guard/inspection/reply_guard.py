"""Server-side reply inspection: a strategy wrapper that drops replies carrying more
than the declared update before the wrapped strategy aggregates them.

Usage::

    strategy = ReplyGuard(FedAvg(...))            # policy="block" by default
    strategy.start(grid, initial_arrays, num_rounds=...)

In ``configure_train`` it records the keys, shapes and dtypes of the arrays sent; in
``aggregate_train`` / ``aggregate_evaluate`` it inspects every reply
(:func:`flwr_guard.inspection.reply.inspect_reply`) and, with ``policy="block"``, hands
only the clean ones to the wrapped strategy (with ``"flag"`` it logs and passes all).
A misbehaving client therefore cannot crash FedAvg's consistency check with an extra
array or record, and what it leaked in metrics never reaches the aggregated metrics.
Findings per round are kept in :attr:`ReplyGuard.findings`. Place it innermost, directly
around the user's strategy, so it sees the replies as the strategy would (after
SecAgg+ unmasking).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_guard.inspection.reply import Finding, ReplyLimits, inspect_reply
from flwr_guard.records import array_shapes, plain_content
from flwr_guard.strategy_wrapper import StrategyWrapper

logger = logging.getLogger(__name__)


class ReplyGuard(StrategyWrapper):
    """Inspect replies and drop (``"block"``) or log (``"flag"``) offending ones.

    Attributes:
        findings: ``{server_round: [(node_id, finding), ...]}`` for train and evaluate
            replies.
        blocked: ``{server_round: [node_id, ...]}`` of dropped replies.

    Raises:
        ValueError: for an unknown policy; TypeError if ``strategy`` is not a Strategy.
    """

    def __init__(
        self,
        strategy: Strategy,
        policy: Literal["block", "flag"] = "block",
        limits: ReplyLimits | None = None,
    ) -> None:
        super().__init__(strategy)
        if policy not in ("block", "flag"):
            raise ValueError(f"policy must be 'block' or 'flag', got {policy!r}")
        self.policy = policy
        self.limits = limits or ReplyLimits()
        self.findings: dict[int, list[tuple[int, Finding]]] = {}
        self.blocked: dict[int, list[int]] = {}
        self._declared: dict[int, dict[str, tuple[tuple[int, ...], str]]] = {}

    def declare(self, server_round: int, arrays: ArrayRecord) -> None:
        """Record the arrays sent in ``server_round`` (what train replies must match)."""
        self._declared[server_round] = array_shapes(arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.declare(server_round, arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _screen(self, server_round: int, replies: Iterable[Message], train: bool) -> list[Message]:
        declared = self._declared.get(server_round, {}) if train else None
        kept: list[Message] = []
        for reply in replies:
            if reply.has_error():
                kept.append(reply)
                continue
            view = plain_content(reply.content)
            found = inspect_reply(
                declared, view["arrays"], view["metrics"], view["configs"], self.limits
            )
            node = reply.metadata.src_node_id
            if found:
                self.findings.setdefault(server_round, []).extend((node, f) for f in found)
                logger.warning(
                    "reply guard: round %d node %d: %s", server_round, node,
                    "; ".join(str(f) for f in found[:10]),
                )
                if self.policy == "block":
                    self.blocked.setdefault(server_round, []).append(node)
                    continue
            kept.append(reply)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self._screen(server_round, replies, train=True)
        self._declared.pop(server_round, None)
        return self.strategy.aggregate_train(server_round, kept)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(
            server_round, self._screen(server_round, replies, train=False)
        )
