"""Start and stop a local Prometheus server with a generated configuration (no Flower).

``flwr-guard demo`` and the tests use it to scrape a run's exporter (and a Pushgateway)
with the real Prometheus binary (Debian's ``prometheus`` package; ``make tools``
installs it), then read the results through Prometheus' HTTP API::

    with LocalPrometheus({"flwr-guard": ["127.0.0.1:9464"]}) as prom:
        ...                                    # the run
        prom.query("flwr_guard_dp_epsilon")    # instant vector, as Prometheus returns it

It listens on 127.0.0.1 only (a free port by default), keeps its data in a temporary
directory that :meth:`LocalPrometheus.stop` deletes, and is stopped by the PID it was
started with (SIGTERM, then SIGKILL after a grace period) — never by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from flwr_guard.deployment.ports import free_port
from flwr_guard.errors import FlwrGuardError

PUSHGATEWAY_JOB = "pushgateway"


class PrometheusError(FlwrGuardError, RuntimeError):
    """Prometheus did not start, or a query failed."""


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` binary, or ``None`` if it is not installed."""
    return shutil.which("prometheus")


def scrape_config(
    targets: Mapping[str, Sequence[str]],
    scrape_interval: str = "1s",
    rule_files: Sequence[str | Path] = (),
    honor_labels: Sequence[str] = (PUSHGATEWAY_JOB,),
) -> dict[str, Any]:
    """A Prometheus configuration scraping ``{job: [host:port, ...]}``.

    Jobs named in ``honor_labels`` keep the labels of the scraped series (a
    Pushgateway's ``job`` and ``run``), as deploy/prometheus/prometheus.yml does.
    """
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(hosts)}],
             **({"honor_labels": True} if job in honor_labels else {})}
            for job, hosts in targets.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    return config


def local_prometheus_if_installed(
    targets: Mapping[str, Sequence[str]], **kwargs: Any
) -> LocalPrometheus | None:
    """A :class:`LocalPrometheus` (not started) if the binary is installed, else ``None``.

    For ``flwr-guard demo``: scrape the run when Prometheus is there, say so otherwise.
    """
    return LocalPrometheus(targets, **kwargs) if prometheus_binary() else None


class LocalPrometheus:
    """A Prometheus server on 127.0.0.1 for the lifetime of a ``with`` block.

    Args:
        targets: ``{job: ["host:port", ...]}`` to scrape.
        port: port to listen on (0 = a free one).
        scrape_interval: e.g. ``"1s"``.
        rule_files: alert/recording rule files to load.
        workdir: where to write the configuration, data and log; ``None`` = a
            temporary directory removed by :meth:`stop`.
        binary: the ``prometheus`` executable; ``None`` = from ``PATH``.
    """

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        *,
        port: int = 0,
        scrape_interval: str = "1s",
        rule_files: Sequence[str | Path] = (),
        workdir: str | Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or prometheus_binary()
        if self.binary is None:
            raise PrometheusError("the prometheus binary is not installed (`make tools`)")
        self.port = port or free_port()
        self.config = scrape_config(targets, scrape_interval, rule_files)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="flwr-guard-prom-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout_s: float = 60.0) -> LocalPrometheus:
        """Write the configuration, start Prometheus, wait until it is ready.

        Raises:
            PrometheusError: if it exits or is not ready within ``timeout_s`` (it is
                stopped, and the end of its log is in the message).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        with (self.workdir / "prometheus.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.pid = self.process.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tail = self.log[-2000:]
        self.stop()
        raise PrometheusError(f"prometheus did not become ready on {self.url}:\n{tail}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the server started by :meth:`start` (by its PID) and clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=grace_s)
        self.process = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API ---------------------------------------------------------------------
    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', response.text)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """``/api/v1/query``: the instant vector of ``expr`` (``[{"metric", "value"}]``)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", params)
        return data["result"] if data["resultType"] == "vector" else [
            {"metric": {}, "value": data["result"]}
        ]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """``/api/v1/query_range``: ``[{"metric", "values": [[t, "v"], ...]}]``."""
        return self._get("/api/v1/query_range",
                         {"query": expr, "start": start, "end": end, "step": step})["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now, ``None`` if empty (error if several)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr} has {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health (``up``/``down``/``unknown``)."""
        return self._get("/api/v1/targets")["activeTargets"]

    def wait_until(self, expr: str, timeout_s: float = 30.0, interval_s: float = 0.5) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty vector; return it.

        Raises:
            PrometheusError: on timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr} stayed empty for {timeout_s} s")
            time.sleep(interval_s)
