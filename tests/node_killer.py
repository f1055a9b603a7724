"""Kill SuperNodes of a real local deployment at chosen points of the message flow.

Flower 1.41's SuperNode logs ``Receiving: <type> message`` when it pulls a message; it
replies only after its ClientApp process (seconds of imports) has handled it, and the
reply goes through the SuperNode. So a SuperNode killed the moment its log shows its
j-th train message after its e-th evaluate message dies holding that message: the
ServerApp is waiting for its reply. Every SecAgg+ stage is a train message, so the
count names the stage (multi-round, a round that sets keys up: advertise, roster,
masked-input, consistency, unmask; a round of a running session: masked-input,
consistency, unmask). Tests check the order through the SecAgg+ round report (the
stage that counted the dropout), not through timing.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TRAIN = "Receiving: train message"
EVALUATE = "Receiving: evaluate message"


@dataclass
class Kill:
    """Kill SuperNode ``node`` (e.g. ``supernode-3``) on its ``train``-th train message
    after its ``evaluates``-th evaluate message (1-based; 0 evaluates: round 1)."""

    node: str
    evaluates: int
    train: int
    label: str = ""
    pid: int | None = None
    node_id: int | None = None
    # the progress file's rounds already written when the kill happened
    rounds_before: int | None = None
    killed_at: float | None = None

    def due(self, log: str) -> bool:
        at = 0
        for _ in range(self.evaluates):
            at = log.find(EVALUATE, at)
            if at < 0:
                return False
            at += len(EVALUATE)
        return log.count(TRAIN, at) >= self.train


def _node_id(log: str) -> int | None:
    marker = "SuperNode ID: "
    at = log.find(marker)
    if at < 0:
        return None
    digits = log[at + len(marker):].split(None, 1)[0]
    return int(digits) if digits.isdigit() else None


class NodeKiller(threading.Thread):
    """Watch ``workdir``'s SuperNode logs; SIGKILL each planned node once, when due."""

    def __init__(self, workdir: Path, plan: list[Kill]) -> None:
        super().__init__(daemon=True)
        self.workdir, self.plan = Path(workdir), plan
        self.done = threading.Event()

    def _process(self, node: str) -> psutil.Process:
        index = node.rsplit("-", 1)[1]
        for child in psutil.Process().children():
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if (any("flower-supernode" in part for part in cmd)
                    and f"partition-id={index} " in " ".join(cmd)):
                return child
        raise AssertionError(f"no process of {node}")

    def _rounds_written(self) -> int:
        path = self.workdir / "progress.jsonl"
        if not path.exists():
            return 0
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and json.loads(line).get("event") == "round")

    def run(self) -> None:
        while not self.done.is_set() and any(k.pid is None for k in self.plan):
            for kill in self.plan:
                log_path = self.workdir / "logs" / f"{kill.node}.log"
                if kill.pid is not None or not log_path.exists():
                    continue
                log = log_path.read_text(encoding="utf-8", errors="replace")
                if kill.due(log):
                    victim = self._process(kill.node)
                    kill.node_id = _node_id(log)
                    kill.rounds_before = self._rounds_written()
                    victim.send_signal(signal.SIGKILL)
                    kill.pid, kill.killed_at = victim.pid, time.monotonic()
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
