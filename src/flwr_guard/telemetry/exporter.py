"""The HTTP exporter that Prometheus scrapes (prometheus-client's ``start_http_server``).

The ServerApp starts it: it serves the run's registry on ``/metrics`` for as long as the
ServerApp process lives (one run). The default address is ``127.0.0.1:9464`` — loopback
only, and a port that does not clash with Flower's SuperLink (8000) or the usual
exporters; deployments that must be scraped over a network set
``FLWR_GUARD_METRICS_ADDRESS=0.0.0.0:9464`` (deploy/compose, deploy/k8s).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464


@dataclass(frozen=True)
class Address:
    """A ``host:port`` to listen on."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int = DEFAULT_PORT) -> Address:
        """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

        Raises:
            ValueError: for an empty host or a port outside 0..65535 (0 = any free port).
        """
        text = text.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""
        if not host:
            raise ValueError(f"metrics address {text!r} has no host")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"metrics address {text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics address {text!r}: port {port} is out of range")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def preferred_port(preferred: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> int:
    """``preferred`` if it can be bound on ``host`` now, else a free port (for demos and
    tests that run beside another exporter)."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError(f"no free port on {host}")


class MetricsExporter:
    """Serve ``registry`` over HTTP at ``address`` (``GET /metrics``).

    Args:
        registry: the registry to serve (flwr-guard's dedicated one).
        address: where to listen; port 0 picks a free port (see :attr:`address` after
            :meth:`start`).

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, registry: CollectorRegistry, address: Address | str = f"{DEFAULT_HOST}:{DEFAULT_PORT}") -> None:
        self.registry = registry
        self.address = Address.parse(address) if isinstance(address, str) else address
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        return f"http://{self.address}/metrics"

    def start(self) -> MetricsExporter:
        """Start serving in a daemon thread.

        Raises:
            OSError: if the address cannot be bound (e.g. the port is in use), with the
                address in the message.
        """
        if self._server is not None:
            return self
        try:
            server, thread = start_http_server(
                self.address.port, addr=self.address.host, registry=self.registry
            )
        except OSError as err:
            raise OSError(
                err.errno, f"cannot serve metrics on {self.address}: {err.strerror or err}"
            ) from err
        self._server, self._thread = server, thread
        self.address = Address(self.address.host, int(server.server_address[1]))
        logger.info("flwr-guard metrics on %s", self.url)
        return self

    def stop(self, linger_s: float = 0.0) -> None:
        """Stop serving, after ``linger_s`` seconds (so a last scrape can see the end)."""
        if self._server is None:
            return
        if linger_s > 0:
            time.sleep(linger_s)
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> MetricsExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
