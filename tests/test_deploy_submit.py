"""The compose `submit` step (flwr_guard.deployment.submit): it exits 0 only when the run
completed, whatever `flwr run` said.

Flower's replies are replayed in the JSON shapes of Flower 1.41 (`flwr run --format json`,
`flwr ls --format json`); the real `flwr` runs against a real SuperLink in the cluster test
(tests/test_deploy_compose_cluster.py).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from flwr_guard.deployment.submit import SubmitError, main, wait_for_final_status


class FakeFlwr:
    """Answers `flwr run` / `ls` / `log` / `stop` with canned Flower replies; records calls."""

    def __init__(self, statuses: list[str | None], run_ok: bool = True) -> None:
        self.statuses = list(statuses)
        self.run_ok = run_ok
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        verb = argv[1]
        if verb == "run":
            out = {"success": True, "run-id": "42"} if self.run_ok else {
                "success": False, "error": "The run configuration has unknown keys"}
            return subprocess.CompletedProcess(argv, 0 if self.run_ok else 1, json.dumps(out), "")
        if verb == "ls":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            if status is None:
                return subprocess.CompletedProcess(argv, 1, "", "connection refused")
            runs = [{"run-id": "42", "status": status, "status-details": "NoAggregate: no round aggregated"}]
            return subprocess.CompletedProcess(argv, 0, json.dumps({"success": True, "runs": runs}), "")
        if verb == "log":
            return subprocess.CompletedProcess(argv, 0, "INFO : round 1\n", "")
        return subprocess.CompletedProcess(argv, 0, "", "")


ARGS = ["--connection", "compose", "--interval", "0", "--timeout", "30", "/opt/app", "num-server-rounds=2"]


def test_exits_0_only_for_a_completed_run(capsys) -> None:
    flwr = FakeFlwr(["pending", "running", "running", "finished:completed"])
    assert main(ARGS, runner=flwr) == 0
    assert flwr.calls[0] == ["flwr", "run", "/opt/app", "compose", "--format", "json",
                             "--run-config", "num-server-rounds=2"]
    assert [c[1] for c in flwr.calls] == ["run", "ls", "ls", "ls", "ls", "log"]
    assert "run 42 finished:completed" in capsys.readouterr().out


@pytest.mark.parametrize("status", ["finished:failed", "finished:stopped"])
def test_a_failed_run_exits_1_with_its_status_and_reason(status, capsys) -> None:
    assert main(ARGS, runner=FakeFlwr(["running", status])) == 1
    err = capsys.readouterr().err
    assert f"run 42 ended as {status}: NoAggregate: no round aggregated" in err


def test_a_refused_run_exits_2_with_flowers_message(capsys) -> None:
    flwr = FakeFlwr(["running"], run_ok=False)
    assert main(ARGS, runner=flwr) == 2
    assert "flwr run was refused (exit 1): The run configuration has unknown keys" in capsys.readouterr().err
    assert [c[1] for c in flwr.calls] == ["run"]


def test_a_superlink_that_stops_answering_ends_the_wait_and_stops_the_run(capsys) -> None:
    flwr = FakeFlwr([None])
    assert main(ARGS, runner=flwr) == 2
    assert "cannot read the status of run 42" in capsys.readouterr().err
    assert [c[1] for c in flwr.calls] == ["run", *["ls"] * 5, "stop"]


def test_one_unanswered_status_read_is_no_verdict() -> None:
    info = wait_for_final_status("42", "compose", 30, 0, runner=FakeFlwr([None, "running", "finished:completed"]))
    assert info["status"] == "finished:completed"


def test_a_run_that_never_ends_times_out() -> None:
    clock = iter(range(0, 1000, 10))
    with pytest.raises(SubmitError, match="did not finish within 25 s"):
        wait_for_final_status("42", "compose", 25, 0, runner=FakeFlwr(["running"]),
                              clock=lambda: float(next(clock)), sleep=lambda _: None)
