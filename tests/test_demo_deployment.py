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


def test_the_default_demo_goes_on_after_a_loss_and_stops_with_a_message_when_too_few_are_left(
    tmp_path,
) -> None:
    """Without --min-nodes the run needs the nodes minus the losses SecAgg+ tolerates
    (3 of 4): one lost SuperNode no longer hangs it ("Waiting for nodes to connect: 3
    connected (minimum required: 4)"), and a second loss ends it with a message and the
    status the SuperLink reports, instead of a wait for nodes that will not come."""
    from node_killer import Kill, NodeKiller

    workdir = tmp_path / "work"
    # supernode-3 at its masked input of round 1 (advertise, roster, masked-input);
    # supernode-2 on its first message of round 2.
    first, second = Kill("supernode-3", 0, 3), Kill("supernode-2", 1, 1)
    killer = NodeKiller(workdir, [first, second])
    killer.start()
    try:
        result = run_demo(DemoOptions(
            nodes=4, rounds=3, workdir=workdir, prometheus=False, status_interval_s=30.0,
            run_config={"audit": False, "local-epochs": 1},
        ))
    finally:
        killer.stop()
    assert first.pid is not None and second.pid is not None
    assert result.min_nodes == 3 and "k=3, t=2" in result.min_nodes_reason
    # Round 1 completed with the three survivors, and round 2 had started, before the
    # second kill: the run went on after the first loss.
    assert first.rounds_before == 1 and second.rounds_before == 2
    round_1 = result.rounds[1]["secagg"]
    assert round_1["aborted"] is None and round_1["survivors"] == 3
    assert round_1["dropouts"]["masked-input"] == 1
    # The second loss leaves 2 of the 3 nodes the run needs: the launcher stopped the run,
    # said why, and read the status the SuperLink gave the run's end.
    assert result.lost_nodes == ["supernode-3", "supernode-2"]
    assert not result.success
    assert result.error is not None
    assert result.error.startswith("2 of 4 SuperNodes left (supernode-2, supernode-3 lost), "
                                   "fewer than the 3 the run needs"), result.error
    assert f"run {result.run_id} ended as finished:stopped" in result.error
    assert result.status == "finished:stopped" and result.status_final
    assert [r["round"] for r in result.rounds][:2] == [0, 1]
    assert alive(result.processes) == []


def test_sigterm_stops_every_process_and_still_writes_the_summary(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    demo = subprocess.Popen(
        [sys.executable, "-m", "flwr_guard.cli", "demo", "--nodes", "2", "--rounds", "3",
         "--no-audit", "--no-prometheus", "--summary", str(summary)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the CLI prints one line per phase when not on a terminal
            if line.startswith("demo: running"):
                break
        else:
            raise AssertionError(f"the demo never ran: {demo.stderr.read() if demo.stderr else ''}")
        demo.send_signal(signal.SIGTERM)
        _, stderr = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, stderr[-3000:]
    assert "interrupted: every process of the demo was stopped" in stderr
    written = json.loads(summary.read_text())
    assert written["interrupted"] == "SIGTERM" and written["success"] is False
    assert written["run_id"] is not None
    assert written["error"].startswith("interrupted by SIGTERM after ")
    assert f"(run {written['run_id']}, last status read: " in written["error"]
    names = {p["name"][:14] for p in written["processes"]}
    assert {"flower-superli", "flower-superno"} <= names
    assert alive(written["processes"]) == []
