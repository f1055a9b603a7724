"""Pushgateway mode: push the run's registry for runs too short to be scraped.

A run that lasts less than a scrape interval (or ends between two scrapes) leaves no
trace in Prometheus through the exporter alone. With a Pushgateway URL
(``pushgateway-url`` in the run config or ``FLWR_GUARD_PUSHGATEWAY_URL``), the server
pushes the whole registry after every round and once more when the run ends, with
prometheus-client's ``push_to_gateway`` (HTTP PUT: the group is replaced, so the
Pushgateway always holds the run's latest state). The group is
``job="flwr-guard", run="<run id>"``; Prometheus scrapes the Pushgateway with
``honor_labels: true`` (deploy/prometheus/prometheus.yml) so ``job`` and ``run`` stay.

Only the long-lived server pushes: a ClientApp process lives for one message, and a
push from it would replace its node's counters with those of one message. Clients'
metrics travel in the reply's MetricRecord instead, or, for long-lived SuperNodes, to a
per-node exporter (:mod:`flwr_guard.telemetry.node`).

Pushed groups stay on the Pushgateway until deleted (:meth:`Pushgateway.delete`), so the
last value of a finished run remains visible; that is the point of this mode.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway

logger = logging.getLogger(__name__)

JOB = "flwr-guard"


class Pushgateway:
    """Push a registry to a Pushgateway under ``job`` and ``{"run": run}``.

    Args:
        url: the Pushgateway, e.g. ``http://127.0.0.1:9091``.
        run: the run id (grouping key).
        job: the job label of the group.
        timeout: seconds per HTTP request.
    """

    def __init__(self, url: str, run: str, job: str = JOB, timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"pushgateway URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.job = job
        self.grouping_key = {"run": str(run)}
        self.timeout = timeout
        self.failures = 0

    def push(self, registry: CollectorRegistry) -> bool:
        """Replace the group with the registry's current values; ``False`` on failure.

        A failed push is logged, never raised: telemetry must not stop training.
        """
        try:
            push_to_gateway(self.url, job=self.job, registry=registry,
                            grouping_key=self.grouping_key, timeout=self.timeout)
            return True
        except OSError as err:  # URLError, connection refused, timeouts, HTTP errors
            self.failures += 1
            logger.warning("flwr-guard: push to %s failed: %s", self.url, err)
            return False

    def delete(self) -> None:
        """Remove the run's group from the Pushgateway."""
        delete_from_gateway(self.url, job=self.job, grouping_key=self.grouping_key,
                            timeout=self.timeout)
