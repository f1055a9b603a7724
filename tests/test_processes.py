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


# -- the demo's view of its SuperNodes: how many a run needs, and when it cannot go on --
def test_the_default_min_nodes_is_the_cohort_minus_the_losses_secagg_tolerates() -> None:
    from flwr_guard.demo import default_min_nodes
    from flwr_guard.secagg.params import SecAggParams

    for nodes in range(2, 12):
        params = SecAggParams.for_cohort(nodes)  # C = ceil(0.05 n), as the server's default
        tolerated = params.num_shares - params.reconstruction_threshold
        needed, why = default_min_nodes(nodes, secagg=True)
        assert needed == min(nodes, max(nodes - tolerated, 3)), nodes
        assert why.startswith(f"SecAgg+ with k={params.num_shares}, "
                              f"t={params.reconstruction_threshold} for a cohort of {nodes} ")
    assert [default_min_nodes(n, True)[0] for n in (2, 3, 4, 5, 6, 10)] == [2, 3, 4, 4, 5, 7]
    # The demo's nodes below 5: C = 0 (secagg-max-colluders), sums of 3: 4 nodes lose one.
    assert default_min_nodes(4, True, node_config={"secagg-max-colluders": 0,
                                                   "secagg-min-honest-others": 2})[0] == 3
    # What the run config sets: the complete graph of 4 (k = 3) with t = 3 loses nothing.
    assert default_min_nodes(4, True, num_shares=3, reconstruction_threshold=3)[0] == 4
    # The nodes' policy: a cohort of all 6 (k = 5, t = 4 alone would lose one).
    needed, why = default_min_nodes(6, True, node_config={"secagg-min-cohort": 6})
    assert needed == 6 and why.endswith("the nodes' policy needs a cohort of at least 6")
    assert default_min_nodes(5, secagg=False) == (
        1, "without SecAgg+ a round aggregates whatever nodes are left")
    import pytest

    with pytest.raises(ValueError, match="nodes must be >= 1, got 0"):
        default_min_nodes(0, True)


def _sleepers(deployment, count: int) -> None:
    """Stand-in SuperNodes (sleeping processes that print a SuperNode ID line)."""
    say = ("import sys, time; print('SuperNode ID: %d' % (1000 + int(sys.argv[1])), flush=True); "
           "time.sleep(120)")
    deployment.superlink = deployment.supervisor.start(
        "superlink", [sys.executable, "-c", "import time; time.sleep(120)"], os.environ)
    for index in range(count):
        deployment.supernodes.append(deployment.supervisor.start(
            f"supernode-{index}", [sys.executable, "-c", say, str(index)], os.environ))
    deployment.wait_for_nodes()


class _SilentRestartTopology:
    """A restarted SuperNode that runs but never registers (no SuperNode ID line)."""

    def supernode_command(self, index: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(120)"]


def test_the_run_is_blocked_once_fewer_supernodes_are_left_than_it_needs(tmp_path) -> None:
    from flwr_guard.demo import DemoOptions, DemoState, _Nodes
    from flwr_guard.deployment.local import LocalDeployment

    deployment = LocalDeployment(_SleepTopology(), tmp_path)  # type: ignore[arg-type]
    state = DemoState(min_nodes=3, min_nodes_reason="SecAgg+ with k=3, t=2 ...")
    nodes = _Nodes(deployment, state, DemoOptions(nodes=4), min_nodes=3)
    try:
        _sleepers(deployment, 4)
        assert deployment.wait_for_nodes() == {f"supernode-{i}": 1000 + i for i in range(4)}
        for index, left in ((3, 3), (1, 2)):
            deployment.supernodes[index].popen.kill()
            deployment.supernodes[index].popen.wait(timeout=30)
            nodes.check()
            assert nodes.left == left
        assert [(e["event"], e["node"], e["node-id"], e["exit-code"]) for e in state.node_events] == [
            ("lost", "supernode-3", 1003, -9), ("lost", "supernode-1", 1001, -9)]
        assert nodes.blocked() == (
            "2 of 4 SuperNodes left (supernode-1, supernode-3 lost), fewer than the 3 the run "
            "needs (min-nodes: SecAgg+ with k=3, t=2 ...); Flower would wait for them forever, "
            "so the launcher stopped the run. Restart the demo, run with --restart-lost-nodes, "
            "or with a smaller --min-nodes")
    finally:
        assert deployment.stop() == []


def test_a_restarted_supernode_is_waited_for_a_bounded_time_then_counts_as_lost(tmp_path) -> None:
    import time

    from flwr_guard.demo import DemoOptions, DemoState, _Nodes
    from flwr_guard.deployment.local import LocalDeployment

    deployment = LocalDeployment(_SilentRestartTopology(), tmp_path)  # type: ignore[arg-type]
    state = DemoState()
    options = DemoOptions(nodes=3, restart_lost_nodes=True, startup_timeout_s=1.0)
    nodes = _Nodes(deployment, state, options, min_nodes=3)
    try:
        _sleepers(deployment, 3)
        deployment.supernodes[2].popen.kill()
        deployment.supernodes[2].popen.wait(timeout=30)
        nodes.check()
        # Restarted at once: counted while it may still connect, and named as awaited.
        assert [e["event"] for e in state.node_events] == ["lost", "restarted"]
        assert nodes.left == 3 and nodes.blocked() is None
        assert nodes.waiting_for().startswith("restarted SuperNode(s) to connect: supernode-2 (at most ")
        assert deployment.node_id("supernode-2") is None  # the new process has no id yet
        deadline = time.monotonic() + 60
        while "not-connected" not in [e["event"] for e in state.node_events]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
            nodes.check()
        assert [e["event"] for e in state.node_events] == ["lost", "restarted", "not-connected"]
        assert nodes.left == 2 and nodes.waiting_for() == ""
        assert nodes.blocked() is not None and "(supernode-2 lost)" in str(nodes.blocked())
    finally:
        assert deployment.stop() == []


def test_wait_for_nodes_names_the_supernodes_that_did_not_connect(tmp_path) -> None:
    import pytest

    from flwr_guard.deployment.local import DeploymentError, LocalDeployment
    from flwr_guard.deployment.topology import Topology

    topology = Topology.on_free_ports(nodes=2)
    deployment = LocalDeployment(topology, tmp_path, startup_timeout=0.5)
    try:
        silent = [sys.executable, "-c", "print('connecting...', flush=True); import time; time.sleep(60)"]
        deployment.supernodes = [
            deployment.supervisor.start("supernode-0", [sys.executable, "-c",
                                        "print('SuperNode ID: 5', flush=True); import time; time.sleep(60)"],
                                        os.environ),
            deployment.supervisor.start("supernode-1", silent, os.environ),
        ]
        assert deployment.wait_for_nodes(["supernode-0"], timeout=60) == {"supernode-0": 5}
        with pytest.raises(DeploymentError) as err:
            deployment.wait_for_nodes()
        message = str(err.value)
        assert message.startswith(f"supernode-1 did not connect to the SuperLink at "
                                  f"{topology.superlink_address} within 0.5 s (1 of 2 connected):")
        assert "connecting..." in message  # its log's last lines
    finally:
        assert deployment.stop() == []


def test_a_supernode_whose_guard_died_is_stopped_and_reported_lost_naming_the_guard(
        tmp_path, monkeypatch, caplog) -> None:
    import logging

    import pytest

    import flwr_guard.node.launch as launch
    from flwr_guard.deployment.local import DeploymentError, LocalDeployment

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    guard = [sys.executable, "-c", "import sys, time; print('guard up', flush=True); time.sleep(60)"]
    # The guard's real commands need Flower; here both are sleepers with the same wiring.
    monkeypatch.setattr(launch, "guarded_commands", lambda *a: (list(sleep), list(guard)))
    deployment = LocalDeployment(_SleepTopology(), tmp_path, node_guard=True)  # type: ignore[arg-type]
    try:
        deployment.superlink = deployment.supervisor.start("superlink", sleep, dict(os.environ))
        deployment.supernodes = [deployment._start_supernode(0), deployment._start_supernode(1)]
        assert set(deployment.guards) == {"supernode-0", "supernode-1"}
        assert oct(os.stat(tmp_path / "node-guard-0").st_mode & 0o777) == "0o700"
        assert deployment.check_alive() == []
        killed = deployment.guards["supernode-1"]
        killed.popen.kill()
        killed.popen.wait(timeout=30)
        with pytest.raises(DeploymentError, match=r"node-guard-1 \(pid \d+\), the node guard of "
                           r"supernode-1, exited with code -9: supernode-1 runs no tasks without it"):
            deployment.check_alive()  # the default: fatal, and the SuperNode was stopped
        assert deployment.supernodes[1].exit_code() is not None
        caplog.set_level(logging.WARNING, logger="flwr_guard.deployment.local")
        assert deployment.check_alive(tolerate_node_loss=True) == ["supernode-1"]
        assert "the node guard of supernode-1" in caplog.text  # the lost node's reason
        assert deployment.supernodes[0].exit_code() is None  # the other node goes on
        # A restart starts the SuperNode and its guard again, both watched.
        back = deployment.restart_supernode("supernode-1")
        assert back.exit_code() is None and deployment.guards["supernode-1"].exit_code() is None
        assert deployment.guards["supernode-1"] is not killed and deployment.lost == []
        assert deployment.check_alive(tolerate_node_loss=True) == []
    finally:
        assert deployment.stop() == []


def test_free_ports_are_chosen_below_the_ephemeral_range() -> None:
    """A port an outgoing connection can take (the kernel's ephemeral range) is never
    handed to a server: one was taken between choice and bind in a full-suite run."""
    from flwr_guard.deployment.ports import LISTEN_PORTS_FROM, ephemeral_range, free_port

    low, _ = ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(LISTEN_PORTS_FROM <= p < low for p in ports), (ports, low)
    assert len(ports) > 1  # random, so that two deployments started at once rarely meet
