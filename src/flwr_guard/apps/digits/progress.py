"""Per-round progress of a run, appended as JSON lines for whoever watches the run.

``flwr-guard demo`` tails this file to draw its live table and to build the JSON
summary; the ServerApp process writes it (it lives as long as the run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import Result, Strategy

from flwr_guard.strategy_wrapper import StrategyWrapper


def _plain(record: MetricRecord | None) -> dict[str, Any]:
    return {} if record is None else {key: value for key, value in record.items()}


class ProgressRecorder(StrategyWrapper):
    """Wrap a strategy and append one JSON line per round to ``path``.

    Each line is ``{"event": "round", "round": r, "elapsed-s": s, "train": {...},
    "evaluate": {...}, "server": {...}}`` with the aggregated client train metrics,
    the aggregated client evaluate metrics and the server-side evaluation, plus
    what ``extras(round)`` returns (e.g. the SecAgg+ round report); a last
    ``{"event": "finished", ...}`` line closes the run. With ``path=""`` nothing is
    written and the wrapper only delegates.
    """

    def __init__(
        self,
        strategy: Strategy,
        path: str = "",
        extras: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.path = Path(path) if path else None
        self.extras = extras
        self._t0 = time.monotonic()
        self._train: dict[int, dict[str, Any]] = {}
        self._evaluate: dict[int, dict[str, Any]] = {}
        self._replies: dict[int, int] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.train_aggregated(server_round, replies, metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self.evaluate_aggregated(server_round, metrics)
        return metrics

    # -- as an observer of GuardedStrategy(observer=...) -------------------------------
    def train_aggregated(self, server_round: int, replies: list[Message],
                         metrics: MetricRecord | None) -> None:
        self._replies[server_round] = sum(not m.has_error() for m in replies)
        self._train[server_round] = _plain(metrics)

    def evaluate_aggregated(self, server_round: int, metrics: MetricRecord | None) -> None:
        self._evaluate[server_round] = _plain(metrics)

    def record_round(self, server_round: int, server_metrics: MetricRecord) -> None:
        """Append the line of ``server_round`` (call from the server's ``evaluate_fn``)."""
        self._write(
            {
                "event": "round",
                "round": server_round,
                "elapsed-s": round(time.monotonic() - self._t0, 3),
                "train-replies": self._replies.get(server_round, 0),
                "train": self._train.get(server_round, {}),
                "evaluate": self._evaluate.get(server_round, {}),
                "server": _plain(server_metrics),
                **(self.extras(server_round) if self.extras and server_round > 0 else {}),
            }
        )

    def finish(self, result: Result, **extras: Any) -> None:
        """Append the closing line of the run, with ``extras`` (JSON-serialisable)."""
        self._write(
            {
                "event": "finished",
                "elapsed-s": round(time.monotonic() - self._t0, 3),
                "rounds": len(result.train_metrics_clientapp),
                **extras,
            }
        )

    def _write(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
