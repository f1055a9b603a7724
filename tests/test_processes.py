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


class _SleepTopology:
    """What LocalDeployment needs of a topology to restart a SuperNode (no Flower)."""

    def supernode_command(self, index: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_lost_supernode_is_reported_and_the_deployment_goes_on(tmp_path) -> None:
    import pytest

    from flwr_guard.deployment.local import DeploymentError, LocalDeployment

    deployment = LocalDeployment(_SleepTopology(), tmp_path)  # type: ignore[arg-type]
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    env = dict(os.environ)
    try:
        deployment.superlink = deployment.supervisor.start("superlink", sleep, env)
        deployment.supernodes = [
            deployment.supervisor.start("supernode-0", sleep, env),
            deployment.supervisor.start("supernode-1", [sys.executable, "-c", "pass"], env),
        ]
        deployment.supernodes[1].popen.wait(timeout=30)
        with pytest.raises(DeploymentError, match="supernode-1"):
            deployment.check_alive()  # the default: any exit is fatal
        assert deployment.check_alive(tolerate_node_loss=True) == ["supernode-1"]
        assert deployment.check_alive(tolerate_node_loss=True) == []  # reported once
        # It comes back (a new process), and is watched again.
        back = deployment.restart_supernode("supernode-1")
        assert back.exit_code() is None and deployment.lost == []
        assert deployment.check_alive(tolerate_node_loss=True) == []
        # The last SuperNode lost: the run cannot go on.
        for proc in deployment.supernodes:
            proc.popen.kill()
            proc.popen.wait(timeout=30)
        with pytest.raises(DeploymentError, match="supernode-"):
            deployment.check_alive(tolerate_node_loss=True)
    finally:
        assert deployment.stop() == []


def test_node_ids_are_read_from_the_supernode_logs_and_a_restart_gets_the_newest(tmp_path) -> None:
    from flwr_guard.deployment.local import LocalDeployment

    deployment = LocalDeployment(_SleepTopology(), tmp_path)  # type: ignore[arg-type]
    say = [sys.executable, "-c", "print('INFO :      SuperNode ID: 8812', flush=True)"]
    try:
        deployment.supernodes = [deployment.supervisor.start("supernode-0", say, os.environ)]
        deployment.supernodes[0].popen.wait(timeout=30)
        assert deployment.node_id("supernode-0") == 8812
        import pytest

        with pytest.raises(ValueError, match="supernode-9"):
            deployment.node_id("supernode-9")
        # The restarted process appends to the same log: its own (new) id counts.
        again = [sys.executable, "-c", "print('SuperNode ID: 77', flush=True)"]
        deployment.supernodes = [deployment.supervisor.start("supernode-0", again, os.environ)]
        deployment.supernodes[0].popen.wait(timeout=30)
        assert deployment.node_id("supernode-0") == 77
    finally:
        assert deployment.stop() == []


def test_the_superexec_poll_interval_goes_into_every_process_environment(tmp_path) -> None:
    import pytest

    from flwr_guard.deployment.local import SUPEREXEC_POLL_ENV, LocalDeployment

    assert LocalDeployment(_SleepTopology(), tmp_path).env[SUPEREXEC_POLL_ENV] == "0.2"  # type: ignore[arg-type]
    fast = LocalDeployment(_SleepTopology(), tmp_path, superexec_poll_interval_s=0.05)  # type: ignore[arg-type]
    assert fast.env[SUPEREXEC_POLL_ENV] == "0.05"
    flower_default = LocalDeployment(_SleepTopology(), tmp_path, superexec_poll_interval_s=None)  # type: ignore[arg-type]
    assert flower_default.env.get(SUPEREXEC_POLL_ENV) == os.environ.get(SUPEREXEC_POLL_ENV)
    with pytest.raises(ValueError, match="0.01, 60"):  # what Flower 1.41 would refuse at start
        LocalDeployment(_SleepTopology(), tmp_path, superexec_poll_interval_s=0.001)  # type: ignore[arg-type]


def test_a_clientapp_process_for_a_control_stage_imports_neither_torch_nor_the_accountant() -> None:
    """Flower 1.41 starts one ClientApp process per message; the SecAgg+ control stages
    do not train, so the reference app's module must not pull in torch, Opacus or
    dp-accounting (with scipy.stats: seconds of imports per message on a loaded node)."""
    import subprocess

    heavy = ("torch", "opacus", "dp_accounting", "scipy.stats", "captum", "torchmetrics")
    probe = ("import sys, flwr_guard.apps.digits.client_app; "
             f"print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
