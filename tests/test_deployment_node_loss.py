"""Node loss: Flower's node-unavailable replies end a SecAgg+ stage early, and a real
deployment goes on when a SuperNode is killed mid-round.

The transport tests run Flower's own SuperLink state (``InMemoryLinkState``, the one
``flower-superlink`` runs, with its heartbeat bookkeeping) behind Flower's
``InMemoryGrid``; node threads pull their messages from that state and store their
replies in it as the Fleet API does. A node that stops sending heartbeats gets
Flower's own ``NODE_UNAVAILABLE`` error reply; nothing is faked.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import alive
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, ErrorCode
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from flwr_guard.secagg.transport import StageReceipt, send_and_receive

RUN_ID, TASK_ID, SUPERLINK = 77, 5, 1
HEARTBEAT_S = 0.2  # the node's announced interval: unavailable 2 x 0.2 s after its last


class _Node(threading.Thread):
    """A node on Flower's link state: heartbeats every ``HEARTBEAT_S / 2`` while
    ``alive``; answers its messages (echoing ``x + 1``) while ``answers``."""

    def __init__(self, state, answers: bool = True) -> None:
        super().__init__(daemon=True)
        self.state, self.answers = state, answers
        self.node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME,
                                         secrets.token_bytes(32), heartbeat_interval=HEARTBEAT_S)
        state.acknowledge_node_heartbeat(self.node_id, HEARTBEAT_S)
        self.alive = threading.Event()
        self.alive.set()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            if self.alive.is_set():
                self.state.acknowledge_node_heartbeat(self.node_id, HEARTBEAT_S)
                if self.answers:
                    for msg in self.state.get_message_ins(self.node_id, limit=None):
                        x = msg.content.config_records["c"]["x"]
                        reply = Message(RecordDict({"c": ConfigRecord({"x": x + 1})}),
                                        reply_to=msg)
                        reply.metadata.__dict__["_message_id"] = reply.object_id
                        assert self.state.store_message_res(reply)
            time.sleep(HEARTBEAT_S / 4)


@pytest.fixture
def link():
    """Flower's in-memory SuperLink state with one run, and an ``InMemoryGrid`` on it."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    # What a ServerApp process holds (Message() reads it).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK, TASK_ID
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    nodes: list[_Node] = []
    yield state, grid, nodes
    for node in nodes:
        node.stopped.set()


def _start(state, nodes: list[_Node], *answers: bool) -> list[_Node]:
    new = [_Node(state, a) for a in answers]
    for node in new:
        node.start()
    nodes += new
    return new


def _messages(nodes: list[_Node]) -> list[Message]:
    return [Message(RecordDict({"c": ConfigRecord({"x": i})}), n.node_id, "train")
            for i, n in enumerate(nodes)]


def test_a_node_that_dies_is_a_dropout_after_its_heartbeat_patience_not_the_timeout(link):
    state, grid, nodes = link
    live_a, live_b, doomed = _start(state, nodes, True, True, False)
    doomed.alive.clear()  # killed: no heartbeat, no reply
    receipt = StageReceipt()
    started = time.monotonic()
    replies = send_and_receive(grid, _messages(nodes), timeout=300.0, receipt=receipt)
    took = time.monotonic() - started
    # Flower marks it unavailable 2 x 0.2 s after its last heartbeat: far below 300 s.
    assert took < 5.0
    good = {r.metadata.src_node_id: r.content.config_records["c"]["x"]
            for r in replies if not r.has_error()}
    assert good == {live_a.node_id: 1, live_b.node_id: 2}
    (error,) = [r for r in replies if r.has_error()]
    assert error.error.code == ErrorCode.NODE_UNAVAILABLE
    assert error.metadata.src_node_id == SUPERLINK  # the SuperLink speaks for the node
    assert list(receipt.unavailable) == [doomed.node_id]
    assert 0 < receipt.unavailable[doomed.node_id] <= took
    assert receipt.timed_out == [] and receipt.not_pushed == []
    # Flower stops listing it at the same time (the same online-until test).
    assert set(grid.get_node_ids()) == {live_a.node_id, live_b.node_id}


def test_a_live_node_that_does_not_answer_is_waited_for_until_the_timeout(link):
    state, grid, nodes = link
    live, silent = _start(state, nodes, True, False)  # silent keeps its heartbeats
    receipt = StageReceipt()
    started = time.monotonic()
    replies = send_and_receive(grid, _messages(nodes), timeout=1.5, receipt=receipt)
    took = time.monotonic() - started
    assert 1.5 <= took < 3.0
    assert [r.metadata.src_node_id for r in replies] == [live.node_id]
    assert receipt.timed_out == [silent.node_id] and receipt.unavailable == {}


def test_a_node_dying_mid_stage_ends_the_wait_when_flower_reports_it(link):
    state, grid, nodes = link
    live, doomed = _start(state, nodes, True, False)
    killer = threading.Timer(1.0, doomed.alive.clear)  # alive (and silent) for 1 s
    killer.start()
    receipt = StageReceipt()
    started = time.monotonic()
    replies = send_and_receive(grid, _messages(nodes), timeout=300.0, receipt=receipt)
    took = time.monotonic() - started
    killer.join()
    # Unavailable 2 x heartbeat interval after its last heartbeat (<= 1 s + 0.4 s).
    assert 1.0 <= took < 1.0 + 2 * HEARTBEAT_S + 1.0
    assert len(replies) == 2 and list(receipt.unavailable) == [doomed.node_id]
    assert receipt.unavailable[doomed.node_id] >= 1.0


def test_a_message_the_superlink_refuses_is_not_waited_for(link):
    state, grid, nodes = link
    (live,) = _start(state, nodes, True)
    # Flower's state refuses a message to a node it does not know (a stale node id).
    unknown = live.node_id + 1
    refused = Message(RecordDict({"c": ConfigRecord({"x": 9})}), unknown, "train")
    receipt = StageReceipt()
    started = time.monotonic()
    replies = send_and_receive(grid, [*_messages(nodes), refused], timeout=300.0,
                               receipt=receipt)
    assert time.monotonic() - started < 5.0
    assert [r.content.config_records["c"]["x"] for r in replies] == [1]
    assert receipt.not_pushed == [unknown]


# -- a real local deployment ---------------------------------------------------------
NODES, VICTIM = 4, "supernode-3"
# Slack for the ServerApp's own work around the wait (pulls, a ClientApp start on a
# loaded 2-core machine).
SLACK_S = 15.0


class _KillInRound2(threading.Thread):
    """Kill ``VICTIM`` by PID the moment it takes its first message of round 2.

    Flower's SuperNode logs ``Receiving: <type> message`` when it pulls one. Round r's
    client evaluation follows round r's training, so the first train message after the
    first ``evaluate`` one is round 2's first SecAgg+ stage: the ServerApp is waiting for
    this node's reply when it dies. Also stamps (on this clock) when each round's line
    reaches the progress file.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(daemon=True)
        self.log = workdir / "logs" / f"{VICTIM}.log"
        self.progress = workdir / "progress.jsonl"
        self.killed_at: float | None = None
        self.pid: int | None = None
        self.round_seen: dict[int, float] = {}
        self.done = threading.Event()

    def _victim(self) -> psutil.Process:
        for child in psutil.Process().children():
            cmd = " ".join(child.cmdline())
            if "flower-supernode" in cmd and f"partition-id={VICTIM.rsplit('-', 1)[1]} " in cmd:
                return child
        raise AssertionError(f"no {VICTIM} process")

    def run(self) -> None:
        while not self.done.is_set():
            if self.killed_at is None and self.log.exists():
                text = self.log.read_text(encoding="utf-8", errors="replace")
                first_eval = text.find("Receiving: evaluate message")
                if first_eval >= 0 and "Receiving: train message" in text[first_eval:]:
                    victim = self._victim()
                    self.pid = victim.pid
                    victim.send_signal(signal.SIGKILL)
                    self.killed_at = time.monotonic()
            if self.progress.exists():
                for line in self.progress.read_text(encoding="utf-8").splitlines():
                    if line.strip() and (event := json.loads(line)).get("event") == "round":
                        self.round_seen.setdefault(event["round"], time.monotonic())
            time.sleep(0.1)


@pytest.mark.deployment
@pytest.mark.timeout(1200)  # 4-8 min on 2 idle cores; 10+ min when other runs share them
def test_a_supernode_killed_mid_secagg_stage_is_a_bounded_dropout_and_comes_back(tmp_path):
    from flwr_guard.demo import DemoOptions, run_demo
    from flwr_guard.deployment.local import NODE_UNAVAILABLE_AFTER_S

    workdir = tmp_path / "work"
    watcher = _KillInRound2(workdir)
    watcher.start()
    options = DemoOptions(
        nodes=NODES, rounds=3, min_nodes=NODES - 1, restart_lost_nodes=True,
        workdir=workdir, prometheus=False,
        # audit off; one local epoch keeps the test short (DP-SGD stays on)
        run_config={"audit": False, "local-epochs": 1},
        status_interval_s=30.0,
    )
    try:
        result = run_demo(options)
    finally:
        watcher.done.set()
        watcher.join()
    assert watcher.killed_at is not None, "the SuperNode was never killed"
    assert result.success, result.error
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    secagg = {r["round"]: r["secagg"] for r in result.rounds if r["round"] > 0}
    assert secagg[1]["cohort"] == secagg[1]["survivors"] == NODES
    # Round 2 completes with exactly the three survivors.
    assert secagg[2]["cohort"] == NODES and secagg[2]["survivors"] == NODES - 1
    assert result.rounds[2]["train-replies"] == NODES - 1
    # The loss is reported: the lost node by name and Flower node id in the demo's
    # summary; in the ServerApp's log, the stage's reply for it is Flower's
    # NODE_UNAVAILABLE error (not a timeout: the stage timeout is 300 s).
    assert result.lost_nodes == [VICTIM]
    lost, restarted = result.node_events
    assert lost["event"] == "lost" and lost["node"] == VICTIM and lost["exit-code"] == -9
    assert isinstance(lost["node-id"], int)
    server_log = (workdir / "serverapp.log").read_text(encoding="utf-8")
    assert "Node Unavailable" in server_log, server_log[-3000:]
    # Stages sent by flwr_guard's transport also log the node and the seconds waited.
    waited = [float(s) for s in re.findall(
        rf"node {lost['node-id']} unavailable after ([0-9.]+) s", server_log)]
    # The restarted SuperNode (a new node id) joins round 3: four survivors again.
    assert restarted["event"] == "restarted" and restarted["node-id"] not in (None, lost["node-id"])
    assert secagg[3]["cohort"] == secagg[3]["survivors"] == NODES
    # The time the loss costs is bounded by Flower's heartbeat rule: the node is
    # reported unavailable at most 2 x 30 s after its last heartbeat, so at most 60 s
    # after its death. The stage it was in waits at most that longer than the same
    # stage without a loss (round 3's); the rest of round 2 is at most a round without
    # loss (round 3, which also sets up new keys for the changed cohort).
    (stage,) = [name for name, count in secagg[2]["dropouts"].items() if count]
    stages_3 = secagg[3]["stage_seconds"]
    assert secagg[2]["stage_seconds"][stage] <= (
        NODE_UNAVAILABLE_AFTER_S + SLACK_S + stages_3.get(stage, max(stages_3.values())))
    assert all(w <= NODE_UNAVAILABLE_AFTER_S + SLACK_S for w in waited)
    round_3_s = watcher.round_seen[3] - watcher.round_seen[2]
    after_kill_s = watcher.round_seen[2] - watcher.killed_at
    assert after_kill_s <= NODE_UNAVAILABLE_AFTER_S + round_3_s + SLACK_S
    round_2_s = watcher.round_seen[2] - watcher.round_seen[1]
    print(f"\nnode loss: killed {VICTIM} (pid {watcher.pid}, node {lost['node-id']}) in "
          f"round 2's {stage} stage; round 2 ended {after_kill_s:.1f} s after the kill; "
          f"round 2 {round_2_s:.1f} s, round 3 {round_3_s:.1f} s; stages round 2 "
          f"{secagg[2]['stage_seconds']}, round 3 {stages_3}; transport waits {waited}")
    assert alive(result.processes) == []
