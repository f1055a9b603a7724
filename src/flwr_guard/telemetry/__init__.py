"""Prometheus telemetry for flwr-guard runs.

Core (no Flower imports): :mod:`~flwr_guard.telemetry.metrics` (metric families in a
dedicated registry), :mod:`~flwr_guard.telemetry.keys` (the MetricRecord keys read),
:mod:`~flwr_guard.telemetry.recorder` (round data -> metric updates),
:mod:`~flwr_guard.telemetry.exporter` (HTTP exporter, default 127.0.0.1:9464),
:mod:`~flwr_guard.telemetry.pushgateway` (push mode for short runs),
:mod:`~flwr_guard.telemetry.config` (run-config keys and environment),
:mod:`~flwr_guard.telemetry.prometheus_server` (start/stop a local Prometheus).

Flower adapters: :class:`~flwr_guard.telemetry.strategy.TelemetryStrategy` (server, the
outermost strategy wrapper) and :mod:`~flwr_guard.telemetry.node` (optional per-node
exporter for long-lived SuperNodes, prometheus-client multiprocess mode); imported
lazily. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from flwr_guard.lazy import lazy_getattr
from flwr_guard.telemetry.config import TelemetryConfig
from flwr_guard.telemetry.exporter import Address, MetricsExporter
from flwr_guard.telemetry.metrics import FAMILIES, NODE_FAMILIES, GuardMetrics
from flwr_guard.telemetry.pushgateway import Pushgateway
from flwr_guard.telemetry.recorder import DPState, ReplyView, TelemetryRecorder

_LAZY = {
    "TelemetryStrategy": "flwr_guard.telemetry.strategy",
    "node_metrics_mod": "flwr_guard.telemetry.node",
    "LocalPrometheus": "flwr_guard.telemetry.prometheus_server",
}

__all__ = [
    "FAMILIES",
    "NODE_FAMILIES",
    "Address",
    "DPState",
    "GuardMetrics",
    "MetricsExporter",
    "Pushgateway",
    "ReplyView",
    "TelemetryConfig",
    "TelemetryRecorder",
    *_LAZY,
]


__getattr__ = lazy_getattr(__name__, _LAZY)
