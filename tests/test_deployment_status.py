"""The launcher reads a run's status until its real end: retries outlast a slow
``flwr ls``, and the launcher gives up only at its deadline, saying why.

The retry logic is a pure core (:class:`StatusTracker`, fake clock and reader here); the
last test runs it through ``LocalDeployment.run_info`` against a fake ``flwr``
executable that times out N times, then answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flwr_guard.deployment.status import (
    StatusPolicy,
    StatusReadError,
    StatusTracker,
    StatusUnknown,
)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _SlowLs:
    """A ``flwr ls`` that needs ``needs_s`` seconds to answer (the status given by
    ``statuses``, one per successful read, the last repeated); an attempt with a shorter
    timeout costs its timeout and fails, as ``subprocess.run(timeout=...)`` does."""

    def __init__(self, clock: _Clock, needs_s: float, statuses: list[str]) -> None:
        self.clock, self.needs_s, self.statuses = clock, needs_s, statuses
        self.timeouts: list[float] = []
        self.answers = 0

    def __call__(self, timeout: float) -> dict:
        self.timeouts.append(timeout)
        if timeout < self.needs_s:
            self.clock.now += timeout
            raise StatusReadError(f"flwr ls did not answer within {timeout:.0f} s")
        self.clock.now += self.needs_s
        status = self.statuses[min(self.answers, len(self.statuses) - 1)]
        self.answers += 1
        return {"run-id": 7, "status": status}


def _follow(tracker: StatusTracker, clock: _Clock, max_polls: int = 1000) -> list[str]:
    """Poll like the launcher's loop (sleeping until the next read is due); return the
    statuses read."""
    seen = []
    for _ in range(max_polls):
        if tracker.finished:
            return seen
        record = tracker.poll()
        if record is not None:
            seen.append(record["status"])
        clock.now = max(clock.now, tracker.next_read_at)
    raise AssertionError("the tracker neither finished nor gave up")


def test_three_timeouts_in_a_row_are_not_a_verdict_the_status_is_read_to_the_end() -> None:
    # The regression: under load `flwr ls` timed out 3 times in a row (60 s each) and the
    # demo reported a completed run as failed. A `flwr ls` that needs 200 s: attempts of
    # 60, 120 and 180 s fail, the fourth (240 s) answers.
    clock = _Clock()
    ls = _SlowLs(clock, needs_s=200.0, statuses=["running", "finished:completed"])
    tracker = StatusTracker(ls, deadline=3600.0, what="run 7", clock=clock)
    seen = _follow(tracker, clock)
    assert ls.timeouts == [60.0, 120.0, 180.0, 240.0, 240.0]
    assert seen == ["running", "finished:completed"]
    assert tracker.status == "finished:completed" and tracker.finished
    assert tracker.total_failures == 3 and tracker.failures == 0


def test_the_backoff_doubles_up_to_its_cap_and_a_slow_superlink_keeps_its_time() -> None:
    policy = StatusPolicy(backoff_s=2.0, max_backoff_s=30.0)
    assert [policy.backoff(f) for f in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [policy.attempt_timeout(f) for f in range(6)] == [60.0, 120.0, 180.0, 240.0, 300.0, 300.0]
    assert policy.attempt_timeout(1, base=120.0) == 180.0
    clock = _Clock()
    ls = _SlowLs(clock, needs_s=100.0, statuses=["running", "running", "finished:failed"])
    tracker = StatusTracker(ls, deadline=3600.0, clock=clock)
    assert _follow(tracker, clock) == ["running", "running", "finished:failed"]
    # After a success the next attempt starts from the timeout that succeeded.
    assert ls.timeouts == [60.0, 120.0, 120.0, 120.0]
    assert tracker.total_failures == 1


def test_an_attempt_never_runs_past_the_deadline() -> None:
    clock = _Clock()
    ls = _SlowLs(clock, needs_s=1000.0, statuses=["running"])
    tracker = StatusTracker(ls, deadline=150.0, clock=clock)
    with pytest.raises(StatusUnknown):
        _follow(tracker, clock)
    assert ls.timeouts[0] == 60.0 and max(ls.timeouts) <= 150.0
    assert clock.now <= 150.0 + StatusPolicy().max_backoff_s


def test_past_the_deadline_it_gives_up_naming_the_attempts_the_error_and_the_last_status() -> None:
    clock = _Clock()
    ls = _SlowLs(clock, needs_s=10.0, statuses=["running"])
    tracker = StatusTracker(ls, deadline=500.0, what="run 7", clock=clock)
    assert tracker.poll() == {"run-id": 7, "status": "running"}
    ls.needs_s = float("inf")  # from now on the SuperLink never answers
    with pytest.raises(StatusUnknown) as err:
        _follow(tracker, clock)
    message = str(err.value)
    assert message.startswith("gave up reading the status of run 7 at its deadline: ")
    assert f"{tracker.total_failures} of {tracker.attempts} reads failed" in message
    assert tracker.attempts == tracker.total_failures + 1 and tracker.total_failures >= 3
    assert "(last: flwr ls did not answer within" in message
    assert "the last status read was 'running'" in message
    assert "real status is unknown" in message
    assert clock.now >= 500.0


def test_a_run_that_ended_by_another_channel_is_read_at_once_and_the_deadline_can_grow() -> None:
    clock = _Clock()
    ls = _SlowLs(clock, needs_s=1.0, statuses=["running", "finished:completed"])
    tracker = StatusTracker(ls, deadline=100.0, policy=StatusPolicy(interval_s=30.0), clock=clock)
    assert tracker.poll() is not None and tracker.next_read_at == 31.0
    clock.now = 5.0
    assert tracker.poll() is None  # not due yet
    tracker.finishing()  # e.g. the ServerApp wrote its last progress line
    assert tracker.poll() == {"run-id": 7, "status": "finished:completed"}
    assert tracker.poll() is None  # finished: no more reads
    tracker.extend_deadline(50.0)
    assert tracker.deadline == 100.0
    tracker.extend_deadline(400.0)
    assert tracker.deadline == 400.0


@pytest.mark.parametrize("field", ["interval_s", "attempt_timeout_s", "backoff_s"])
def test_a_policy_that_cannot_work_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=f"StatusPolicy.{field} must be > 0, got 0"):
        StatusPolicy(**{field: 0})


# A `flwr` executable: the first TIMEOUTS calls hang (as a loaded SuperLink's did), later
# ones answer `flwr ls ... --format json` as Flower 1.41 does.
FAKE_FLWR = """\
#!{python}
import json, pathlib, sys, time
counter = pathlib.Path({counter!r})
calls = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(calls))
if calls <= {timeouts}:
    time.sleep(600)
print(json.dumps({{"success": True, "runs": [{{"run-id": 7, "status": "finished:completed",
                                              "status-details": ""}}]}}))
"""


def test_run_info_through_a_flwr_ls_that_times_out_three_times_then_answers(tmp_path: Path) -> None:
    from flwr_guard.deployment.local import DeploymentError, LocalDeployment, StatusReadFailed
    from flwr_guard.deployment.topology import Topology

    counter = tmp_path / "calls"
    fake = tmp_path / "flwr"
    fake.write_text(FAKE_FLWR.format(python=sys.executable, counter=str(counter), timeouts=3))
    fake.chmod(0o755)
    deployment = LocalDeployment(Topology.on_free_ports(nodes=1), tmp_path, flwr_cli=str(fake))
    # One attempt that times out is an error the launcher can retry, not a verdict.
    with pytest.raises(StatusReadFailed, match="flwr ls did not answer within 1 s") as err:
        deployment.run_info("7", timeout=1.0)
    assert isinstance(err.value, DeploymentError)
    # The tracker retries: its attempts of 1 and 2 s hang too, the third (3 s) is answered.
    policy = StatusPolicy(attempt_timeout_s=1.0, attempt_timeout_step_s=1.0, backoff_s=0.01,
                          max_backoff_s=0.01, interval_s=0.01)
    tracker = StatusTracker(lambda timeout: deployment.run_info("7", timeout=timeout),
                            deadline=float("inf"), policy=policy, what="run 7")
    while not tracker.finished:
        tracker.poll()
    assert tracker.status == "finished:completed"
    assert tracker.total_failures == 2 and tracker.attempts == 3
    assert int(counter.read_text()) == 4
    assert json.loads(json.dumps(tracker.record))["run-id"] == 7
    assert deployment.stop() == []
