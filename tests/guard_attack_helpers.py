"""Shared pieces: a tampering loopback grid and simple apps (as in tests/test_guard.py)."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from guard_harness import LoopbackGrid

SHAPE = (6, 5)


def arrays(w):
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})


def initial():
    return arrays(np.zeros(SHAPE, dtype=np.float32))


def train_fn(step=0.01, seen=None):
    def train(msg: Message, context: Context) -> Message:
        w_in = msg.content["arrays"]["w"].numpy()
        if seen is not None:
            seen.append((context.node_id, w_in.copy()))
        w = w_in + step * (1 + context.node_id % 3)
        return Message(RecordDict({"arrays": arrays(w),
                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)
    return train


def app(mods, step=0.01, seen=None, fn=None):
    a = ClientApp()
    a.train(mods=list(mods))(fn or train_fn(step, seen))
    return a


def fedavg(n):
    return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)


def stage(msg):
    rec = msg.content.config_records.get("secagg")
    return None if rec is None else rec.get("stage")


class TamperGrid(LoopbackGrid):
    """A malicious server's transport: ``tamper(msg) -> msg`` rewrites each message."""

    def __init__(self, apps, tamper, **kw):
        super().__init__(apps, **kw)
        self.tamper = tamper

    def push_messages(self, messages):
        return super().push_messages([self.tamper(m) for m in messages])


def clear_updates(grid):
    return [r for r in grid.received if not r.has_error()
            and any(name != "masked" for name in r.content.array_records)]
