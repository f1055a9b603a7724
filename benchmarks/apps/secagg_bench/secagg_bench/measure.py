"""What the benchmark measures, on both sides of the grid.

Server: :class:`MeasuringGrid` wraps the ServerApp's grid. Between
:meth:`~MeasuringGrid.begin_round` and :meth:`~MeasuringGrid.end_round` it times every
exchange (wall clock and the ServerApp thread's CPU time) and counts the payload bytes
sent to and received from each node: the size of each message's ``RecordDict`` in
Flower's protobuf encoding (what a deployment puts on the wire, without the message
metadata). An exchange is one ``send_and_receive`` call, or (flwr-guard's
``secagg.transport``) one ``push_messages`` and the ``pull_messages`` calls that follow
it, up to the pull that brings the last reply (the sleeps between pulls count as grid
time). Server compute = round time - time inside the grid.

Client: :func:`timing_mod`, the outermost mod, times the rest of the mod chain and the
train function per message (wall clock and the thread's CPU time) and appends one JSON
line per message to the run config's ``client-log``. :func:`drop_mod` makes chosen
partitions fail, with an error reply, at one protocol stage (a dropout).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_to_proto

from flwr_guard.secagg.constants import SECAGG_RECORD

# Canonical drop stage -> the stage name each implementation uses for it.
DROP_STAGES = {
    "masked-input": {"fedavg": "train", "guard": "masked-input", "guard-dp": "masked-input",
                     "flower": "collect_masked_vectors"},
    "unmask": {"guard": "unmask", "guard-dp": "unmask", "flower": "unmask"},
}
# Stage that carries the model update (its successful replies are the survivors).
UPDATE_STAGE = DROP_STAGES["masked-input"]


def stage_of(msg: Message) -> str:
    """The protocol stage a message belongs to (``train`` for a plain train message)."""
    if msg.has_content():
        records = msg.content.config_records
        if SECAGG_RECORD in records:
            return str(records[SECAGG_RECORD]["stage"])
        if RECORD_KEY_CONFIGS in records and Key.STAGE in records[RECORD_KEY_CONFIGS]:
            return str(records[RECORD_KEY_CONFIGS][Key.STAGE])
    return str(msg.metadata.message_type)


def payload_bytes(msg: Message) -> int:
    """Bytes of the message's content in Flower's protobuf encoding (0 for an error)."""
    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


# -- client side ---------------------------------------------------------------------
def timing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Time the inner mods + train function; append a JSON line to ``client-log``."""
    stage = stage_of(msg)  # before the inner mods: Flower's mod pops the stage key
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    reply = call_next(msg, context)
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    path = str(context.run_config.get("client-log", ""))
    if path:
        line = json.dumps(
            {
                "node": context.node_id,
                "stage": stage,
                "wall_s": round(wall, 6),
                "cpu_s": round(cpu, 6),
                "t_end": time.time(),
                "error": reply.has_error(),
            }
        )
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)
    return reply


def drop_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Fail, as a dropped client would, at the run config's ``drop-stage``."""
    raw = str(context.run_config.get("drop-partitions", ""))
    dropping = {int(x) for x in raw.split(",") if x.strip()}
    if dropping and int(context.node_config.get("partition-id", -1)) in dropping:
        variant = str(context.run_config["variant"])
        target = DROP_STAGES[str(context.run_config["drop-stage"])].get(variant)
        if target is not None and stage_of(msg) == target:
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="benchmark dropout"),
                reply_to=msg,
            )
    return call_next(msg, context)


# -- server side ---------------------------------------------------------------------
class MeasuringGrid:
    """Delegates to the real grid; measures time and bytes of each exchange per round."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.rounds: list[dict[str, Any]] = []
        self._round: dict[str, Any] | None = None
        self._open: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def begin_round(self, server_round: int) -> None:
        self._close_open()
        self._round = {
            "round": server_round,
            "t_start": time.time(),
            "stages": [],
            "_wall0": time.perf_counter(),
            "_cpu0": time.thread_time(),
            "_measure_wall_s": 0.0,
            "_measure_cpu_s": 0.0,
        }

    def end_round(self, completed: bool) -> dict[str, Any]:
        """Close the round; return its record (times in seconds, bytes per node)."""
        self._close_open()
        rec = self._round
        assert rec is not None, "end_round without begin_round"
        self._round = None
        measure_wall, measure_cpu = rec.pop("_measure_wall_s"), rec.pop("_measure_cpu_s")
        wall = time.perf_counter() - rec.pop("_wall0") - measure_wall
        cpu = time.thread_time() - rec.pop("_cpu0") - measure_cpu
        grid_wall = sum(s["grid_wall_s"] for s in rec["stages"])
        grid_cpu = sum(s["grid_cpu_s"] for s in rec["stages"])
        down: dict[int, int] = defaultdict(int)
        up: dict[int, int] = defaultdict(int)
        for stage in rec["stages"]:
            for node, size in stage["bytes_down"].items():
                down[node] += size
            for node, size in stage["bytes_up"].items():
                up[node] += size
        rec.update(
            t_end=time.time(),
            completed=completed,
            wall_s=wall,
            grid_wall_s=grid_wall,
            server_wall_s=wall - grid_wall,
            server_cpu_s=cpu - grid_cpu,
            bytes_down=dict(down),
            bytes_up=dict(up),
            measure_overhead_s=measure_wall,
        )
        self.rounds.append(rec)
        return rec

    # An exchange: opened by send_and_receive or push_messages, closed when the last
    # reply arrived (or, for push/pull, at the next exchange or the end of the round).
    def _open_exchange(self, messages: list[Message]) -> None:
        self._close_open()
        m0, c0 = time.perf_counter(), time.thread_time()
        down: dict[int, int] = defaultdict(int)
        for msg in messages:
            down[msg.metadata.dst_node_id] += payload_bytes(msg)
        self._open = {
            "stage": stage_of(messages[0]),
            "messages": len(messages),
            "_wall0": m0,
            "_cpu0": c0,
            "_measure": time.perf_counter() - m0,
            "_measure_cpu": time.thread_time() - c0,
            "_end": None,
            "_pending": None,
            "bytes_down": dict(down),
            "bytes_up": defaultdict(int),
            "ok": [],
            "failed": [],
        }

    def _count_replies(self, replies: list[Message]) -> None:
        op = self._open
        m0, c0 = time.perf_counter(), time.thread_time()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                op["failed"].append(node)
            else:
                op["ok"].append(node)
                op["bytes_up"][node] += payload_bytes(reply)
            if op["_pending"] is not None:
                op["_pending"].discard(reply.metadata.reply_to_message_id)
        op["_measure"] += time.perf_counter() - m0
        op["_measure_cpu"] += time.thread_time() - c0
        op["_end"] = (time.perf_counter(), time.thread_time())

    def _close_open(self) -> None:
        op, self._open = getattr(self, "_open", None), None
        rec = self._round
        if op is None or rec is None:
            return
        end_wall, end_cpu = op["_end"] or (time.perf_counter(), time.thread_time())
        rec["_measure_wall_s"] += op["_measure"]
        rec["_measure_cpu_s"] += op["_measure_cpu"]
        rec["stages"].append(
            {
                "stage": op["stage"],
                "messages": op["messages"],
                "grid_wall_s": end_wall - op["_wall0"] - op["_measure"],
                "grid_cpu_s": end_cpu - op["_cpu0"] - op["_measure_cpu"],
                "bytes_down": op["bytes_down"],
                "bytes_up": dict(op["bytes_up"]),
                "ok": sorted(op["ok"]),
                "failed": sorted(op["failed"]),
            }
        )

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if self._round is None or not messages:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        self._open_exchange(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count_replies(replies)
        self._close_open()
        return replies

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        if self._round is None or not messages:
            return self._grid.push_messages(messages)
        self._open_exchange(messages)
        ids = list(self._grid.push_messages(messages))
        self._open["_pending"] = set(ids)
        self._open["_end"] = (time.perf_counter(), time.thread_time())
        return ids

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(self._grid.pull_messages(message_ids))
        if self._open is not None and self._open["_pending"] is not None:
            self._count_replies(replies)
            if not self._open["_pending"]:
                self._close_open()
        return replies
