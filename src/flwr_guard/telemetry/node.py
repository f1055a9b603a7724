"""Optional per-node exporter for long-lived SuperNodes (prometheus-client multiprocess mode).

By default clients export nothing themselves: what they measure travels in the reply's
MetricRecord and the server exports it (:mod:`flwr_guard.telemetry.strategy`). A
SuperNode, however, lives long and starts a fresh ``flwr-clientapp`` process for every
message, which an in-process exporter would not outlive. For operators who want each
node's own view, this module uses prometheus-client's multiprocess mode
(https://prometheus.github.io/client_python/multiprocess/): every ClientApp process
writes its values to memory-mapped files in a shared directory, and one long-lived
exporter per node sums them on each scrape.

Set-up on a node (see docs/metrics.md)::

    export PROMETHEUS_MULTIPROC_DIR=/var/lib/flwr-guard/metrics     # before anything starts
    python -m flwr_guard.telemetry.node --dir "$PROMETHEUS_MULTIPROC_DIR" --wipe \
        --address 127.0.0.1:9465 &
    flower-supernode ...                       # its ClientApp processes inherit the env

and ``node_metrics_mod`` outermost in the ClientApp: ``@app.train(mods=[node_metrics_mod,
...])`` (or ``ClientApp(mods=[...])`` for every message type). Without
``PROMETHEUS_MULTIPROC_DIR`` the mod does nothing.

The families (labels ``run``, ``message_type``, ``status``) describe the node's own work,
never its data: messages handled, time per message, and the last record-level epsilon
and audit verdicts the node reported. Every ClientApp process leaves its own small
files (a few per process, 64 KiB sparse each) that the exporter reads on every scrape;
restart the exporter with ``--wipe`` (and the SuperNode) to clear them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from flwr_guard.telemetry import keys
from flwr_guard.telemetry.exporter import Address, MetricsExporter
from flwr_guard.telemetry.keys import lookup
from flwr_guard.telemetry.metrics import STAGE_SECONDS_BUCKETS

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_NODE_ADDRESS = "127.0.0.1:9465"


class _NodeMetrics:
    def __init__(self) -> None:
        # A private registry: multiprocess values go to the files, not to this object.
        registry = CollectorRegistry()
        self.messages = Counter(
            "flwr_guard_clientapp_messages", "Messages this node's ClientApp handled.",
            ("run", "message_type", "status"), registry=registry)
        self.duration = Histogram(
            "flwr_guard_clientapp_message_duration_seconds",
            "Time the ClientApp (mods included) took per message.",
            ("run", "message_type"), buckets=STAGE_SECONDS_BUCKETS, registry=registry)
        self.record_epsilon = Gauge(
            "flwr_guard_clientapp_dp_record_epsilon",
            "Record-level (DP-SGD) epsilon in this node's last train reply.",
            ("run",), registry=registry, multiprocess_mode="mostrecent")
        self.leaks = Counter(
            "flwr_guard_clientapp_audit_leak_verdicts",
            "Audits on this node whose verdict was 'leaks'.", ("run",), registry=registry)
        # The node guard (flwr_guard.node): what it enforced, one update per round.
        self.guard_rounds = Counter(
            "flwr_guard_node_guard_rounds",
            "Rounds the node guard closed, by verdict (sent-masked, sent-clear, refused).",
            ("run", "verdict", "policy"), registry=registry)
        self.guard_survivors = Gauge(
            "flwr_guard_node_guard_secagg_survivors",
            "SecAgg+ survivors of the last round this node's guard took part in.",
            ("run",), registry=registry, multiprocess_mode="mostrecent")
        self.guard_noise = Gauge(
            "flwr_guard_node_guard_noise_multiplier",
            "Noise multiplier the node guard let into its last update (0: none).",
            ("run",), registry=registry, multiprocess_mode="mostrecent")


_metrics: _NodeMetrics | None = None
_lock = threading.Lock()


def _node_metrics() -> _NodeMetrics | None:
    """The node families, or ``None`` when multiprocess mode is not configured."""
    global _metrics
    if not os.environ.get(MULTIPROC_ENV):
        return None
    with _lock:
        if _metrics is None:
            from prometheus_client import values

            if "MultiProcessValue" not in values.ValueClass.__qualname__:
                logger.warning("%s was set after prometheus_client was imported: node "
                               "metrics stay in this process only", MULTIPROC_ENV)
            _metrics = _NodeMetrics()
        return _metrics


def node_metrics_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: count and time each message for the node's exporter.

    A no-op without ``PROMETHEUS_MULTIPROC_DIR``. Errors of the metrics themselves are
    logged and never change the reply.
    """
    metrics = _node_metrics()
    if metrics is None:
        return call_next(msg, context)
    started = time.monotonic()
    run, kind = str(msg.metadata.run_id), str(msg.metadata.message_type)
    try:
        reply = call_next(msg, context)
    except BaseException:
        # The app raised: Flower answers with an error reply; count it, then let it go on.
        metrics.messages.labels(run, kind, "error").inc()
        metrics.duration.labels(run, kind).observe(time.monotonic() - started)
        raise
    try:
        status = "error" if reply.has_error() else "ok"
        metrics.messages.labels(run, kind, status).inc()
        metrics.duration.labels(run, kind).observe(time.monotonic() - started)
        if status == "ok":
            for record in reply.content.metric_records.values():
                epsilon = lookup(record, keys.RECORD_EPSILON)
                if epsilon is not None:
                    metrics.record_epsilon.labels(run).set(epsilon)
                if (lookup(record, keys.LEAK) or 0.0) > 0:
                    metrics.leaks.labels(run).inc()
    except Exception:
        logger.exception("node_metrics_mod: could not record metrics")
    return reply


def record_guard_round(run: str, values: dict[str, object], count_round: bool = True) -> None:
    """Export one round of the node guard's line (:mod:`flwr_guard.node.round_log`).

    ``values``: ``verdict`` (text starting with ``sent masked``, ``sent in the clear``
    or ``refused``), ``policy`` (digest), ``survivors`` (int or ``None``), ``noise``
    (text with ``z=<float>`` when noise was added), ``epsilon`` (float or ``None``).
    ``count_round=False`` (a session round's recovery stage, after its line was counted)
    updates the gauges without counting the round again. A no-op without
    ``PROMETHEUS_MULTIPROC_DIR``.
    """
    import re

    metrics = _node_metrics()
    if metrics is None:
        return
    verdict = str(values.get("verdict", ""))
    kind = ("refused" if verdict.startswith("refused") else
            "sent-masked" if verdict.startswith("sent masked") else "sent-clear")
    if count_round:
        metrics.guard_rounds.labels(run, kind, str(values.get("policy", ""))).inc()
    survivors = values.get("survivors")
    if isinstance(survivors, int):
        metrics.guard_survivors.labels(run).set(survivors)
    found = re.search(r"z=([0-9.eE+-]+)", str(values.get("noise", "")))
    if kind != "refused" and count_round:
        metrics.guard_noise.labels(run).set(float(found.group(1)) if found else 0.0)
    epsilon = values.get("epsilon")
    if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool):
        metrics.record_epsilon.labels(run).set(float(epsilon))
    if str(values.get("audit", "")) == "leaks" and count_round:
        metrics.leaks.labels(run).inc()


def wipe(directory: str | os.PathLike[str]) -> int:
    """Delete the multiprocess ``*.db`` files in ``directory``; return how many."""
    removed = 0
    for path in Path(directory).glob("*.db"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def node_exporter(directory: str | os.PathLike[str], address: Address | str = DEFAULT_NODE_ADDRESS
                  ) -> MetricsExporter:
    """An exporter (not started) that sums every process's files in ``directory``.

    Raises:
        NotADirectoryError: if ``directory`` does not exist.
    """
    if not Path(directory).is_dir():
        raise NotADirectoryError(f"{directory} is not a directory (set {MULTIPROC_ENV} to one)")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return MetricsExporter(registry, address)


def main(argv: list[str] | None = None) -> None:
    """``python -m flwr_guard.telemetry.node``: serve a node's metrics until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.environ.get(MULTIPROC_ENV, ""),
                        help=f"multiprocess directory (default ${MULTIPROC_ENV})")
    parser.add_argument("--address", default=DEFAULT_NODE_ADDRESS, help="host:port to listen on")
    parser.add_argument("--wipe", action="store_true", help="delete old *.db files first")
    args = parser.parse_args(argv)
    if not args.dir:
        parser.error(f"--dir or ${MULTIPROC_ENV} is required")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if args.wipe:
        wipe(args.dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    exporter = node_exporter(args.dir, args.address).start()
    print(f"serving {args.dir} on {exporter.url}", flush=True)
    stop.wait()
    exporter.stop()


if __name__ == "__main__":
    main()
