"""flwr-guard: protect what Flower clients share.

Secure aggregation (SecAgg+), differential privacy, gradient-leakage audits and
Prometheus telemetry for Flower's Message API (``flwr.clientapp`` /
``flwr.serverapp``). See the project README and ``docs/`` for the architecture and
threat model.
"""

__version__ = "0.1.0"
