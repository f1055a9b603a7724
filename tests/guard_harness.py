"""The one in-process Grid of the tests: each node runs a real ClientApp.

Messages go through Flower's own ``ClientApp.__call__`` (mods and handlers) and are
copied through Flower's protobuf serde both ways, as on the wire; there is no
SuperLink, no SuperNode and no Ray. The end-to-end tests run real simulations.
Subclasses change who answers (:meth:`LoopbackGrid.answer`): ``secagg_harness``'s
``ModFederation`` hands each instruction to the node's real ``secaggplus_mod`` after a
deviating server's ``tamper`` hook; ``guard_attack_helpers``' tampering grid rewrites
what is pushed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from flwr_guard.dp.record_ledger import init_ledger

RUN_ID = 4242
# In-process nodes are one operator's processes, as in Flower's simulation: trust on
# first use (no federation roster) and cohorts of 2 allowed unless a test says otherwise.
SIMULATION_NODE_CONFIG = {"secagg-trust-on-first-use": True, "secagg-min-cohort": 2}


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


class LoopbackGrid(Grid):
    """Nodes ``{node_id: ClientApp}``; every message is answered at push time."""

    def __init__(self, apps: dict[int, ClientApp], run_config: dict | None = None,
                 node_config: dict[int, dict] | None = None, *,
                 contexts: dict[int, Context] | None = None, run_id: int = RUN_ID) -> None:
        self.apps = apps
        self.run_id = run_id
        # Flower 1.41's Message() reads the process's task identity (set by the ServerApp
        # process in a real run).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        if contexts is None:
            ledgers = tempfile.mkdtemp(prefix="dp-sgd-ledger-")
            configs = {node: {**SIMULATION_NODE_CONFIG, "dp-sgd-ledger": ledgers,
                              "dp-sgd-data-source": f"node-{node}", **(node_config or {}).get(node, {})}
                       for node in apps}
            for config in configs.values():  # as the operator's `flwr-guard ledger init` would
                init_ledger(config["dp-sgd-ledger"], config["dp-sgd-data-source"])
            contexts = {node: Context(run_id, node, configs[node], RecordDict(), dict(run_config or {}))
                        for node in apps}
        self.contexts = contexts
        self.replies: dict[str, Message] = {}
        self.pushed: list[Message] = []  # every message as the strategy pushed it
        self.sent: list[Message] = []  # every message as the clients received it
        self.received: list[Message] = []  # every reply as the server received it

    def set_run(self, run) -> None:  # pragma: no cover - not used by strategies
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def answer(self, node: int, incoming: Message) -> Message | None:
        """The node's reply to ``incoming`` (``None``: it never answers)."""
        try:
            return self.apps[node](incoming, self.contexts[node])
        except Exception as err:  # as Flower's ClientApp runtime: an error reply
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 f"{type(err).__name__}: {err}"), reply_to=incoming)

    def deliver(self, msg: Message) -> Message | None:
        """Stamp ``msg`` as a SuperLink would, copy it through the wire format, hand it to
        its node and return the reply (copied back through the wire format), or ``None``."""
        msg.metadata.__dict__["_message_id"] = str(uuid4())
        msg.metadata.__dict__["_run_id"] = self.run_id
        msg.metadata.__dict__["_src_node_id"] = 0
        incoming = _wire(msg)
        self.sent.append(incoming)
        reply = self.answer(msg.metadata.dst_node_id, incoming)
        return None if reply is None else _wire(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.pushed.append(msg)
            reply = self.deliver(msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
                self.received.append(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return list(self.pull_messages(self.push_messages(messages)))
