"""Send one SecAgg+ stage and collect its replies, polling faster than Flower does.

``Grid.send_and_receive`` of Flower 1.41 sleeps 3 s between two pulls; SecAgg+ has five
stages per round, so that alone adds up to 15 s of idle time to every round. This
pushes with ``Grid.push_messages`` and pulls with ``Grid.pull_messages`` (the Grid's
public API) with a back-off from ``first_interval_s`` to ``max_interval_s`` (default: a
pull every 50 ms; a pull of nothing is one small request to the SuperLink). Measured in
``benchmarks/secagg.py`` (n = 20): the four control stages took 0.90-0.94 s per round
with a 50 ms cap against 1.35-1.42 s with a 1 s cap (docs/secagg.md).

Lost nodes. A node that stops answering is not waited for until ``timeout``: the
SuperLink of Flower 1.41 answers a pull for a message whose destination node missed
its heartbeats with an error reply of code ``ErrorCode.NODE_UNAVAILABLE`` (reply
``src_node_id`` = the SuperLink, 1; ``reply_to_message_id`` = our message), as soon as
``online_until`` (last heartbeat + ``HEARTBEAT_PATIENCE`` (2) x the node's heartbeat
interval) has passed (``flwr.server.superlink.linkstate.utils.
check_node_availability_for_in_message``). A SuperNode of 1.41 announces a fixed
30 s interval (``HEARTBEAT_DEFAULT_INTERVAL``; ``flower-supernode`` has no option for
it) and sends a heartbeat every 17.5-22.5 s, so a killed SuperNode is reported within
60 s of its death (between 37.5 s and 60 s). That error reply ends the wait for that
node here; it is logged naming the node and counted in :class:`StageReceipt`.
``Grid.get_node_ids()`` drops the node at the same instant (the same ``online_until``
test, ``LinkState.get_nodes``), so polling it would detect nothing sooner and is not
done. A message the SuperLink did not accept (``push_messages`` returns ``None`` for
it) is never waited for either.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid


@dataclass
class StageReceipt:
    """What one :func:`send_and_receive` call saw, for reports (all times in seconds).

    Attributes:
        unavailable: ``{node_id: seconds after the push}`` of the nodes Flower reported
            unavailable (``ErrorCode.NODE_UNAVAILABLE``).
        not_pushed: destination node ids of the messages the SuperLink refused.
        timed_out: destination node ids still without a reply at ``timeout``.
        seconds: wall time of the call.
    """

    unavailable: dict[int, float] = field(default_factory=dict)
    not_pushed: list[int] = field(default_factory=list)
    timed_out: list[int] = field(default_factory=list)
    seconds: float = 0.0


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    first_interval_s: float = 0.05,
    max_interval_s: float = 0.05,
    receipt: StageReceipt | None = None,
) -> list[Message]:
    """Push ``messages``, pull replies until each has one or ``timeout`` (s) passes.

    A reply is the node's own, or the SuperLink's error reply for it (a node reported
    unavailable: ``ErrorCode.NODE_UNAVAILABLE``, see the module docstring); either
    ends the wait for that message.

    Args:
        grid: the ServerApp's Grid.
        messages: one message per destination node.
        timeout: seconds to wait for the last reply, > 0.
        first_interval_s, max_interval_s: seconds between two pulls (doubling from
            the first to the cap).
        receipt: filled in with the unavailable, refused and timed-out nodes.

    Returns:
        The replies received (error replies included), in arrival order; fewer than
        the messages sent if some nodes did not answer in time or a message could not
        be pushed.
    """
    messages = list(messages)
    receipt = receipt if receipt is not None else StageReceipt()
    started = time.monotonic()
    # Flower's Grids set each message's id on push and return the ids accepted (the
    # HTTP Grid puts None for a refused message, the in-memory Grid leaves it out).
    accepted = {str(i) for i in grid.push_messages(messages) if i}
    destination: dict[str, int] = {}
    for msg in messages:
        if msg.metadata.message_id in accepted:
            destination[msg.metadata.message_id] = msg.metadata.dst_node_id
        else:
            receipt.not_pushed.append(msg.metadata.dst_node_id)
    if receipt.not_pushed:
        log(WARNING, "SecAgg+ transport: the SuperLink did not accept the messages to "
            "nodes %s; they count as dropouts", receipt.not_pushed)
    pending = set(destination)
    deadline = started + timeout
    replies: list[Message] = []
    interval = first_interval_s
    while pending:
        received = [m for m in grid.pull_messages(pending)
                    if m.metadata.reply_to_message_id in pending]
        replies.extend(received)
        for reply in received:
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                node = destination[reply.metadata.reply_to_message_id]
                after = time.monotonic() - started
                receipt.unavailable[node] = after
                log(WARNING, "SecAgg+ transport: node %s unavailable after %.1f s "
                    "(Flower: no heartbeat within 2 x its interval); it counts as a "
                    "dropout", node, after)
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        interval = min(interval * 2, max_interval_s)
    receipt.timed_out = sorted(destination[i] for i in pending)
    receipt.seconds = time.monotonic() - started
    return replies
