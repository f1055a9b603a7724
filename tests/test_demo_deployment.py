"""`flwr-guard demo` on a real local deployment: SuperLink + SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import FIXTURES, alive

from flwr_guard.demo import DemoOptions, DemoState, run_demo

pytestmark = pytest.mark.deployment


def _demo(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "flwr_guard.cli", "demo", "--summary", str(summary), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return done, json.loads(summary.read_text()) if summary.exists() else {}


def test_two_supernodes_two_rounds_accuracy_rises_and_nothing_is_left(tmp_path) -> None:
    done, summary = _demo(tmp_path, "--nodes", "2", "--rounds", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["success"] and summary["status"] == "finished:completed"
    assert summary["mode"] == "deployment" and summary["nodes"] == 2
    accuracy = [r["server"]["test-accuracy"] for r in summary["rounds"]]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    # DP-SGD (record level) and SecAgg+ are on by default: learning is slower, but real.
    assert accuracy[2] > accuracy[0] + 0.2 and accuracy[2] == summary["final_test_accuracy"]
    assert 0 < summary["privacy"]["dp-sgd-epsilon"] < summary["privacy"]["dp-sgd-max-epsilon"]
    assert all(r["secagg"]["survivors"] == 2 for r in summary["rounds"][1:])
    assert all(r["train-replies"] == 2 for r in summary["rounds"][1:])
    # Every node audited its update each round; with DP-SGD nothing leaks.
    assert all(r["train"]["audit-ran"] == 2 for r in summary["rounds"][1:])
    assert summary["audit"]["audit-leaks"] == 0
    # The ServerApp's metrics were scraped by a real Prometheus (`make tools`) up to the
    # last round.
    assert summary["prometheus_url"], "the prometheus binary is missing: run `make tools`"
    assert summary["scraped"]["round"] == 2
    assert summary["scraped"]["server-accuracy"] == pytest.approx(accuracy[2])
    assert summary["scraped"]["audits"] == 4
    names = {p["name"] for p in summary["processes"]}
    assert {"flower-superlin", "flower-superno", "flwr-serverapp"} <= {n[:15] for n in names} | {
        n[:14] for n in names
    }
    assert alive(summary["processes"]) == []


def test_serverapp_failure_is_reported_as_failure(tmp_path) -> None:
    done, summary = _demo(tmp_path, "--nodes", "1", "--app", str(FIXTURES / "failing_app"))
    assert done.returncode == 1
    assert summary["success"] is False and summary["status"] == "finished:failed"
    assert "deliberate ServerApp failure" in summary["error"]
    assert "demo failed" in done.stderr
    assert alive(summary["processes"]) == []


def test_supernode_dying_mid_run_fails_clearly_without_orphans(tmp_path) -> None:
    killed: list[int] = []

    def kill_one_supernode(state: DemoState) -> None:
        if state.phase != "running" or killed:
            return
        for child in psutil.Process().children():
            if "flower-supernode" in " ".join(child.cmdline()):
                child.send_signal(signal.SIGKILL)
                killed.append(child.pid)
                return

    # tolerate_node_loss=False: the demo's default goes on without a lost node (tested in
    # test_processes.py); this one must end at once and clearly.
    options = DemoOptions(nodes=2, rounds=3, workdir=tmp_path / "work", tolerate_node_loss=False)
    result = run_demo(options, kill_one_supernode)
    assert killed
    assert not result.success
    assert result.error is not None and "supernode-" in result.error
    assert f"(pid {killed[0]}) exited with code -9" in result.error
    assert alive(result.processes) == []
    assert os.path.isdir(result.workdir)  # logs kept for a failed run
