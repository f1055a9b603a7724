"""Base class for flwr-guard's strategy wrappers.

A wrapper holds the user's ``flwr.serverapp.strategy.Strategy`` and delegates what it
does not change, the way Flower's own DP wrappers do. ``Strategy.start`` (the round
loop) is inherited unchanged, so a wrapped strategy runs exactly like the bare one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Delegate every ``Strategy`` method to ``strategy``; subclasses override some.

    Attributes that the wrapper does not define (``fraction_train``, ...) are read
    from the wrapped strategy.
    """

    def __init__(self, strategy: Strategy) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"expected a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}"
            )
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: fall through to the wrapped strategy.
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
