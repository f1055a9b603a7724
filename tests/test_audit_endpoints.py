"""`flwr-guard audit-endpoints` and its core against real HTTP servers on 127.0.0.1:
a clean prometheus-client exporter, and a service that exposes a debug endpoint and
per-example data in its metrics."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from typer.testing import CliRunner

from flwr_guard.cli import app
from flwr_guard.inspection.endpoints import audit_endpoints, check_exporter_text

LEAKY_METRICS = "\n".join(
    ["# TYPE client_sample_loss gauge"]
    + [f'client_sample_loss{{sample_id="{i}"}} 0.{i}' for i in range(150)]
    + ["# TYPE model_gradient_values gauge", 'model_gradient_values{layer="fc"} 0.1', ""]
)


class _Leaky(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {"/metrics": LEAKY_METRICS, "/debug/vars": '{"memstats": {}}', "/": "ok"}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def leaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Leaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def clean_exporter():
    registry = CollectorRegistry()
    Gauge("flwr_guard_round", "current round", registry=registry).set(3)
    Counter("flwr_guard_replies", "replies", ["status"], registry=registry).labels("ok").inc(4)
    Gauge("flwr_guard_update_grad_norm", "aggregate norm", registry=registry).set(1.0)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_leaky_service_and_exporter_are_reported(leaky_server) -> None:
    found = audit_endpoints([leaky_server], [f"{leaky_server}/metrics"], timeout_s=2)
    kinds = {(f.kind, f.url.rsplit("/", 1)[-1]) for f in found}
    assert ("debug-endpoint", "vars") in kinds
    assert {k for k, _ in kinds} >= {"per-example-metric", "per-example-label",
                                       "high-cardinality-metric", "gradient-metric"}
    assert not any("0.1" in f.detail for f in found)  # values are never echoed


def test_clean_exporter_has_no_findings(clean_exporter) -> None:
    assert audit_endpoints([], [clean_exporter]) == []


def test_unreachable_and_plaintext_are_findings() -> None:
    found = audit_endpoints(["http://127.0.0.1:9"], timeout_s=0.5)
    assert [f.kind for f in found] == ["unreachable"]
    text_found = check_exporter_text("x", "# TYPE up gauge\nup 1\n")
    assert text_found == []
    import httpx

    from flwr_guard.inspection.endpoints import check_service

    with httpx.Client(timeout=0.5) as client:
        kinds = [f.kind for f in check_service("http://10.255.255.1:8000", client, paths=())]
    assert kinds[0] == "plaintext"
    with pytest.raises(ValueError):
        audit_endpoints(["ftp://127.0.0.1"])


def test_cli_exit_codes(leaky_server, clean_exporter, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "findings.json"
    bad = runner.invoke(app, ["audit-endpoints", "--service", leaky_server,
                              "--exporter", f"{leaky_server}/metrics", "--json", str(out)])
    assert bad.exit_code == 1, bad.output
    assert any(f["kind"] == "per-example-label" for f in json.loads(out.read_text()))
    good = runner.invoke(app, ["audit-endpoints", "--exporter", clean_exporter])
    assert good.exit_code == 0, good.output
    assert runner.invoke(app, ["audit-endpoints"]).exit_code == 2
