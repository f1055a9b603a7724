"""The optional per-node exporter: prometheus-client multiprocess mode across ClientApp
processes that each handle one message, summed by one exporter and scraped by a real
Prometheus server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest
from conftest import FIXTURES
from test_telemetry_metrics import _wait_http, samples

from flwr_guard.deployment import free_port
from flwr_guard.telemetry.prometheus_server import LocalPrometheus

ONE_MESSAGE = FIXTURES / "telemetry_node" / "one_message.py"


def _client_process(directory, kind: str, epsilon: float, fail: bool) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, str(ONE_MESSAGE), kind, str(epsilon), "1" if fail else "0"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout.strip()


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus server is not installed: `make tools`")
def test_node_exporter_sums_every_clientapp_process(tmp_path) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"")  # left over from an earlier SuperNode
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "flwr_guard.telemetry.node", "--dir", str(directory),
         "--address", f"127.0.0.1:{port}", "--wipe"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/metrics")
        assert not list(directory.glob("*.db"))  # --wipe removed the stale file
        # Four ClientApp processes, one message each: 3 train (one fails), 1 evaluate.
        outcomes = [_client_process(directory, *args) for args in
                    (("train", 1.5, False), ("train", 0.0, True), ("evaluate", 0.25, False),
                     ("train", 2.75, False))]
        assert outcomes == ["ok", "error", "ok", "ok"]
        # each process leaves its own files (counter, histogram, gauge): 2-3 per process
        assert 8 <= len(list(directory.glob("*.db"))) <= 12
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        got = samples(text)

        def v(name: str, **labels: str) -> float:
            return got[(name, frozenset({"run": "42", **labels}.items()))]

        assert v("flwr_guard_clientapp_messages_total", message_type="train", status="ok") == 2
        assert v("flwr_guard_clientapp_messages_total", message_type="train", status="error") == 1
        assert v("flwr_guard_clientapp_messages_total", message_type="evaluate", status="ok") == 1
        assert v("flwr_guard_clientapp_message_duration_seconds_count", message_type="train") == 3
        assert v("flwr_guard_clientapp_audit_leak_verdicts_total") == 3
        # mostrecent: the last process's value, not a sum or a max over processes
        assert v("flwr_guard_clientapp_dp_record_epsilon") == 2.75

        with LocalPrometheus({"flwr-guard-node": [f"127.0.0.1:{port}"]}) as prom:
            result = prom.wait_until(
                'flwr_guard_clientapp_messages_total{message_type="train",status="ok"}')
            assert float(result[0]["value"][1]) == 2
            assert result[0]["metric"]["instance"] == f"127.0.0.1:{port}"  # the node = target
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)
    assert exporter.returncode == 0, exporter.stdout.read() if exporter.stdout else ""


def test_mod_is_a_no_op_without_multiprocess_dir(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, str(ONE_MESSAGE), "train", "1.0", "0"], env=env, capture_output=True,
        text=True, timeout=120, check=True, cwd=tmp_path,
    )
    assert done.stdout.strip() == "ok"
    assert not list(tmp_path.glob("*.db"))


def test_node_exporter_refuses_a_missing_directory(tmp_path) -> None:
    from flwr_guard.telemetry.node import node_exporter

    with pytest.raises(NotADirectoryError, match="PROMETHEUS_MULTIPROC_DIR"):
        node_exporter(tmp_path / "missing")
