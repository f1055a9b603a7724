"""The supervisor stops what it started and everything that spawned, by PID."""

from __future__ import annotations

import os
import sys
import time

from flwr_guard.deployment.processes import ProcessSupervisor

# A parent that starts a detached grandchild in a new session and exits: the
# grandchild is reparented to init, as Flower's SuperExec processes are.
SPAWNER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
time.sleep(300)
"""


def test_stop_all_reaches_detached_grandchildren(tmp_path) -> None:
    supervisor = ProcessSupervisor(tmp_path)
    parent = supervisor.start("spawner", [sys.executable, "-c", SPAWNER], os.environ)
    deadline = time.monotonic() + 20
    while len(supervisor.refresh()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = supervisor.refresh()
    assert len(seen) == 2
    parent.popen.kill()  # the grandchild is now an orphan of init
    parent.popen.wait()
    survivors = supervisor.stop_all(timeout=5)
    assert survivors == []
    assert not any(record.is_alive() for record in seen)


def test_dead_reports_exited_processes(tmp_path) -> None:
    supervisor = ProcessSupervisor(tmp_path)
    proc = supervisor.start("short", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"], os.environ)
    proc.popen.wait(timeout=20)
    assert supervisor.dead() == [proc] and proc.exit_code() == 3
    assert "bye" in proc.log_tail()
    supervisor.stop_all()
