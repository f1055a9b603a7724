"""One Prometheus metric family as docs/metrics.md lists it (no Flower, no registry).

:mod:`flwr_guard.telemetry.metrics` and :mod:`flwr_guard.telemetry.robustness` both
declare their families with :func:`family`, so neither imports the other's module.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "flwr_guard_"
RUN_LABELS = ("run", "strategy")


@dataclass(frozen=True)
class Family:
    """One metric family as docs/metrics.md lists it.

    Attributes:
        name: the exposed name (counters: with ``_total``; histograms: the base name of
            ``_bucket``/``_sum``/``_count``).
        kind: ``"counter"``, ``"gauge"``, ``"histogram"`` or ``"info"``.
        unit: the unit of the value, in words.
        labels: label names, ``run`` and ``strategy`` first.
        help: the HELP text served to Prometheus.
    """

    name: str
    kind: str
    unit: str
    labels: tuple[str, ...]
    help: str


def family(name: str, kind: str, unit: str, extra: tuple[str, ...], help_: str) -> Family:
    """``Family`` named ``flwr_guard_<name>`` with the ``run`` and ``strategy`` labels first."""
    return Family(PREFIX + name, kind, unit, RUN_LABELS + extra, help_)
