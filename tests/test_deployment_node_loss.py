"""Node loss: Flower's node-unavailable replies end a SecAgg+ stage early, and a real
deployment goes on when a SuperNode is killed at the roster stage, at masked input or
at unmask (issue 20: each round completes with the survivors).

The transport tests run Flower's own SuperLink state (``InMemoryLinkState``, the one
``flower-superlink`` runs, with its heartbeat bookkeeping) behind Flower's
``InMemoryGrid``; node threads pull their messages from that state and store their
replies in it as the Fleet API does. A node that stops sending heartbeats gets
Flower's own ``NODE_UNAVAILABLE`` error reply; nothing is faked.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import replace

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
from node_killer import Kill, NodeKiller

from flwr_guard.secagg.transport import StageReceipt, send_and_receive

RUN_ID, TASK_ID, SUPERLINK = 77, 5, 1
HEARTBEAT_S = 0.2  # the node's announced interval: unavailable 2 x 0.2 s after its last
TIMEOUT_S = 300.0  # the stage timeout the heartbeat patience must end the wait far before
# No timing windows on a busy CPU: the assertions check the order of events (a node is
# reported unavailable after it died, never before) and that the wait ends on Flower's
# report, long before the stage timeout (a fifth of it: 60 s against 0.4 s expected).
FAR_BELOW_TIMEOUT_S = TIMEOUT_S / 5


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
    replies = send_and_receive(grid, _messages(nodes), timeout=TIMEOUT_S, receipt=receipt)
    took = time.monotonic() - started
    # Flower marks it unavailable 2 x 0.2 s after its last heartbeat: far below 300 s.
    assert took < FAR_BELOW_TIMEOUT_S
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
    assert took >= 1.5  # waited for the whole timeout: the node is alive, only silent
    assert [r.metadata.src_node_id for r in replies] == [live.node_id]
    assert receipt.timed_out == [silent.node_id] and receipt.unavailable == {}


def test_a_node_dying_mid_stage_ends_the_wait_when_flower_reports_it(link):
    state, grid, nodes = link
    live, doomed = _start(state, nodes, True, False)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        doomed.alive.clear()

    killer = threading.Timer(1.0, kill)  # alive (and silent) for 1 s
    receipt = StageReceipt()
    started = time.monotonic()
    killer.start()
    replies = send_and_receive(grid, _messages(nodes), timeout=TIMEOUT_S, receipt=receipt)
    took = time.monotonic() - started
    killer.join()
    assert len(replies) == 2 and list(receipt.unavailable) == [doomed.node_id]
    # Reported unavailable only after it died, and the wait ended on that report.
    (kill_time,) = killed_at
    assert kill_time - started <= receipt.unavailable[doomed.node_id] <= took
    assert took < FAR_BELOW_TIMEOUT_S


def test_a_message_the_superlink_refuses_is_not_waited_for(link):
    state, grid, nodes = link
    (live,) = _start(state, nodes, True)
    # Flower's state refuses a message to a node it does not know (a stale node id).
    unknown = live.node_id + 1
    refused = Message(RecordDict({"c": ConfigRecord({"x": 9})}), unknown, "train")
    receipt = StageReceipt()
    started = time.monotonic()
    replies = send_and_receive(grid, [*_messages(nodes), refused], timeout=TIMEOUT_S,
                               receipt=receipt)
    assert time.monotonic() - started < FAR_BELOW_TIMEOUT_S
    assert [r.content.config_records["c"]["x"] for r in replies] == [1]
    assert receipt.not_pushed == [unknown]


# -- a real local deployment ---------------------------------------------------------
# One run of the demo (4 SuperNodes, 3 rounds, the default min-nodes, lost SuperNodes
# restarted) in which one SuperNode is killed per round, each at another SecAgg+ stage.
# Every restart brings a node with a new Flower id into the cohort, so each of the three
# rounds sets keys up (advertise, roster, masked-input, consistency, unmask: 5 train
# messages per node; node_killer.py counts them).
NODES, ROUNDS = 4, 3
ROSTER = Kill("supernode-3", evaluates=0, train=2, label="roster")
MASKED = Kill("supernode-2", evaluates=1, train=3, label="masked-input")
UNMASK = Kill("supernode-1", evaluates=2, train=5, label="unmask")


@pytest.fixture(scope="module")
def node_loss_run(tmp_path_factory):
    """The demo's summary, the kills (with the victims' node ids) and the ServerApp log."""
    from flwr_guard.demo import DemoOptions, run_demo

    workdir = tmp_path_factory.mktemp("node-loss") / "work"
    plan = [replace(k) for k in (ROSTER, MASKED, UNMASK)]
    killer = NodeKiller(workdir, plan)
    killer.start()
    options = DemoOptions(
        nodes=NODES, rounds=ROUNDS, restart_lost_nodes=True, workdir=workdir, prometheus=False,
        # audit off; one local epoch keeps the run short (DP-SGD stays on)
        run_config={"audit": False, "local-epochs": 1},
        status_interval_s=30.0,
    )
    try:
        result = run_demo(options)
    finally:
        killer.stop()
    server_log = (workdir / "serverapp.log").read_text(encoding="utf-8")
    kills = {k.label: k for k in plan}
    return result, kills, server_log


def _secagg(result, server_round: int) -> dict:
    (line,) = [r for r in result.rounds if r["round"] == server_round]
    return line["secagg"]


def _killed_in_round(kill: Kill, server_round: int) -> None:
    """The kill happened during ``server_round``: after the previous round's progress
    line (round 0 is the initial evaluation) and before this round's."""
    assert kill.pid is not None, f"{kill.node} was never killed ({kill.label})"
    assert kill.rounds_before == server_round, (kill.label, kill.rounds_before)


@pytest.mark.deployment
@pytest.mark.timeout(1800)  # 6-10 min on 2 idle cores; more when other runs share them
def test_a_supernode_killed_at_the_roster_stage_leaves_the_round_to_the_survivors(node_loss_run):
    result, kills, _ = node_loss_run
    _killed_in_round(kills["roster"], 1)
    secagg = _secagg(result, 1)
    assert secagg["aborted"] is None, secagg["aborted"]
    assert secagg["key_setup"] and secagg["cohort"] == NODES
    assert secagg["dropouts"].get("roster") == 1  # the kill preceded its roster reply
    assert secagg["survivors"] == NODES - 1


@pytest.mark.deployment
@pytest.mark.timeout(1800)
def test_a_supernode_killed_at_masked_input_leaves_the_round_to_the_survivors(node_loss_run):
    result, kills, _ = node_loss_run
    _killed_in_round(kills["masked-input"], 2)
    secagg = _secagg(result, 2)
    # The restarted roster-stage victim (a new node id) made this round set keys up.
    assert secagg["key_setup"] and secagg["cohort"] == NODES
    assert secagg["aborted"] is None, secagg["aborted"]
    assert {s: c for s, c in secagg["dropouts"].items() if c} == {"masked-input": 1}
    assert secagg["survivors"] == NODES - 1
    (line,) = [r for r in result.rounds if r["round"] == 2]
    assert line["train-replies"] == NODES - 1 and "train-loss" in line["train"]


@pytest.mark.deployment
@pytest.mark.timeout(1800)
def test_a_supernode_killed_at_unmask_leaves_the_round_complete(node_loss_run):
    result, kills, _ = node_loss_run
    _killed_in_round(kills["unmask"], 3)
    secagg = _secagg(result, 3)
    assert secagg["key_setup"] and secagg["cohort"] == NODES
    assert secagg["aborted"] is None, secagg["aborted"]
    assert {s: c for s, c in secagg["dropouts"].items() if c} == {"unmask": 1}
    # It sent its masked input before dying: its update is in the sum (the server
    # reconstructs its self mask from its neighbours' shares).
    assert secagg["survivors"] == NODES
    (line,) = [r for r in result.rounds if r["round"] == 3]
    assert line["train-replies"] == NODES


@pytest.mark.deployment
@pytest.mark.timeout(1800)
def test_the_launcher_reports_each_loss_and_restart_and_the_runs_true_end(node_loss_run):
    from flwr_guard.demo import default_min_nodes

    result, kills, server_log = node_loss_run
    assert result.success, result.error
    assert result.status == "finished:completed" and result.status_final
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    # Without --min-nodes the run needs 3 of its 4 nodes: SecAgg+ (k = 3, t = 2 for a
    # cohort of 4) completes a round after one loss.
    # The demo's nodes below 5 hold C = 0 and sums of 3 (write_federation's min_cohort).
    demo_nodes = {"secagg-max-colluders": 0, "secagg-min-honest-others": 2}
    assert (result.min_nodes, result.min_nodes_reason) == default_min_nodes(NODES, True, node_config=demo_nodes)
    assert result.min_nodes == NODES - 1 and "k=3, t=2" in result.min_nodes_reason
    # Each loss in the order of the kills, by name and Flower node id, each followed by
    # its restart under a new id.
    victims = [kills[s] for s in ("roster", "masked-input", "unmask")]
    assert result.lost_nodes == [k.node for k in victims]
    lost = [e for e in result.node_events if e["event"] == "lost"]
    assert [(e["node"], e["node-id"], e["exit-code"]) for e in lost] == [
        (k.node, k.node_id, -9) for k in victims]
    events = [(e["event"], e["node"]) for e in result.node_events if e["event"] != "not-connected"]
    assert events == [x for k in victims for x in (("lost", k.node), ("restarted", k.node))]
    restarted = [e for e in result.node_events if e["event"] == "restarted"]
    for event in restarted[:2]:  # they joined the next round
        assert event["node-id"] not in (None, event["previous-node-id"])
    # The ServerApp saw each loss as Flower's NODE_UNAVAILABLE reply, not a stage timeout
    # (300 s): flwr_guard's transport (roster, unmask) logs the node and the seconds it
    # waited; the masked inputs come through Flower's loop, and the reply's error names it.
    for kill in (kills["roster"], kills["unmask"]):
        assert re.search(rf"node {kill.node_id} unavailable after [0-9.]+ s", server_log), (
            kill, server_log[-3000:])
    masked = kills["masked-input"]
    assert re.search(rf"SecAgg\+ masked-input: node {masked.node_id} failed: .*Node Unavailable",
                     server_log), server_log[-3000:]
    assert alive(result.processes) == []
    for line in result.rounds[1:]:  # for docs/demo.md (pytest -s)
        report = line["secagg"]
        print(f"\nround {line['round']}: cohort {report['cohort']}, survivors "
              f"{report['survivors']}, key set-up {report['key_setup']}, dropouts "
              f"{ {s: c for s, c in report['dropouts'].items() if c} }, stages "
              f"{report['stage_seconds']}, aborted {report['aborted']}, ended at "
              f"{line['elapsed-s']:.0f} s")
