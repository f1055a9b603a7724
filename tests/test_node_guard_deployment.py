"""The node guard in a real local deployment (a SuperLink, 2 guarded SuperNodes).

Flower's quickstart app, unmodified on the client side (``fixtures/quickstart/plain``:
no flwr_guard import), submitted to SuperNodes that run under the guard
(``LocalDeployment(node_guard=True)``: ``--isolation process`` and the guard's
SuperExec). One deployment serves every check:

(a) the plain app with a plain FedAvg server: every node refuses, and the server's log
    holds each node's reason;
(b) the same client with the server side changed (``fixtures/node_guard/quickstart_guarded``,
    signed by a publisher the nodes trust): the update reaches the server only masked
    and noised (the server's SecAgg+ sum; each node's round line);
(c) an app that adds the node's raw images to its reply (pinned, so it runs): blocked;
(d) an app on no allow-list: refused before its code is installed.
(e) is a deployment without the guard: the same plain app runs as before.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import FIXTURES
from flwr.cli.build import build_fab_from_disk

from flwr_guard.deployment import LocalDeployment, Topology
from flwr_guard.node.allowlist import fab_hash
from flwr_guard.node.fab_signature import load_private_key, sign_app_dir, write_private_key
from flwr_guard.secagg.keys import write_federation

pytestmark = pytest.mark.deployment

PLAIN = FIXTURES / "quickstart" / "plain"
GUARDED = FIXTURES / "node_guard" / "quickstart_guarded"
LEAKY = FIXTURES / "node_guard" / "leaky"
UNLISTED = FIXTURES / "quickstart" / "protected"
NODES = 2
COMPLETED = "finished:completed"


def _wait(deployment: LocalDeployment, run_id: str, timeout: float = 420) -> str:
    deadline, status = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        deployment.check_alive()
        status = str(deployment.run_info(run_id).get("status", ""))
        if status.startswith("finished:"):
            return status
        time.sleep(2)
    pytest.fail(f"run {run_id} did not finish in {timeout:.0f} s (status {status!r})")


def _node_logs(deployment: LocalDeployment) -> list[str]:
    return [p.log_path.read_text(errors="replace") for p in deployment.supernodes]


def _guard_logs(deployment: LocalDeployment) -> list[str]:
    logs = sorted(deployment.supervisor.log_dir.glob("node-guard-*.log"))
    return [p.read_text(errors="replace") for p in logs]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node-guard")
    signed = tmp / "quickstart_guarded"
    shutil.copytree(GUARDED, signed, ignore=shutil.ignore_patterns("__pycache__"))
    public = write_private_key(tmp / "publisher.key")
    sign_app_dir(signed, load_private_key(tmp / "publisher.key"))
    pins = ",".join(fab_hash(build_fab_from_disk(app)) for app in (PLAIN, LEAKY))
    node_config = {
        "guard-fab-hashes": pins,
        "guard-fab-trusted-keys": public,
        "guard-require-dp": "distributed",      # user-level protection on every reply
        "guard-min-noise-multiplier": 1.0,
    }
    topo = Topology.on_free_ports(nodes=NODES, node_config=node_config,
                                  per_node_config=tuple(write_federation(tmp / "federation", NODES,
                                                                         min_cohort=NODES)))
    with LocalDeployment(topo, tmp / "work", node_guard=True) as deployment:
        yield deployment, signed


def test_a_plain_app_with_a_plain_server_is_refused_by_every_guarded_node(guarded) -> None:
    deployment, _ = guarded
    run_id = deployment.submit(PLAIN, {"num-server-rounds": 1})
    _wait(deployment, run_id)
    log = deployment.run_log(run_id)
    refusals = re.findall(r"Received error in reply from node (\d+): (flwr-guard policy refused:[^\n]*)", log)
    assert len({node for node, _ in refusals}) == NODES, log[-3000:]
    assert all("SecAgg+" in reason or "protection manifest" in reason for _, reason in refusals)
    assert "Received 0 results" in log
    for text in _guard_logs(deployment):
        line = next(line for line in text.splitlines() if f"node round 1 (run {run_id})" in line)
        assert "refused: flwr-guard policy refused" in line and "policy " in line, line


def test_the_plain_client_reaches_the_server_only_masked_and_noised(guarded) -> None:
    deployment, signed = guarded
    run_id = deployment.submit(signed, {"num-server-rounds": 1})
    assert _wait(deployment, run_id) == COMPLETED
    log = deployment.run_log(run_id)
    assert f"flwr-guard round 1: SecAgg+ summed {NODES} of {NODES} sampled clients" in log, log[-3000:]
    assert "refused" not in log
    digest = fab_hash(build_fab_from_disk(signed))
    for text in _guard_logs(deployment):
        assert f"the app of FAB {digest} runs in a child process" in text
        line = next(line for line in text.splitlines()
                    if f"(run {run_id})" in line and "flwr-guard node round 1" in line)
        assert "sent masked" in line and f"SecAgg+ survivors {NODES}" in line, line
        assert "noise distributed z=1" in line, line


def test_an_app_that_adds_raw_data_to_its_reply_is_blocked(guarded) -> None:
    deployment, _ = guarded
    run_id = deployment.submit(LEAKY, {"num-server-rounds": 1})
    _wait(deployment, run_id)
    log = deployment.run_log(run_id)
    # Nothing reached the server: every node's masked input is missing (a dropout to the
    # server), and each node's round line says why it sent nothing.
    assert "SecAgg+ summed" not in log and "masked-input: 0 clients left" in log, log[-3000:]
    for text in _guard_logs(deployment):
        line = next(line for line in text.splitlines() if f"node round 1 (run {run_id})" in line)
        assert "refused: the reply must hold one ArrayRecord" in line, line


def test_an_app_on_no_allow_list_is_refused_before_it_is_installed(guarded) -> None:
    deployment, _ = guarded
    run_id = deployment.submit(UNLISTED, {"num-server-rounds": 1})
    _wait(deployment, run_id)
    log = deployment.run_log(run_id)
    digest = fab_hash(build_fab_from_disk(UNLISTED))
    assert f"flwr-guard node refused the app: FAB {digest} is not on this node's allow-list" in log, log[-3000:]
    for text in _guard_logs(deployment):  # no app process ran (it would install the FAB)
        assert f"node refused the app: FAB {digest}" in text
        assert f"the app of FAB {digest} runs" not in text


def test_without_the_guard_the_same_plain_app_runs_as_before(tmp_path: Path) -> None:
    topo = Topology.on_free_ports(nodes=NODES)
    with LocalDeployment(topo, tmp_path / "work") as deployment:
        run_id = deployment.submit(PLAIN, {"num-server-rounds": 1})
        assert _wait(deployment, run_id) == COMPLETED
        log = deployment.run_log(run_id)
        assert f"Received {NODES} results and 0 failures" in log, log[-3000:]
