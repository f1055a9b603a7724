"""Model-hash binding is checked on the first ArrayRecord only.

A malicious server keeps the announced model as the first ArrayRecord (the hash the
SecAgg+ mod checks, and the 'global' its update is computed against) and puts a model of
its own choosing, different per client, under 'arrays' (what Flower-style train
functions read). The client trains on the server's per-client model and masks
local - announced: the model-inconsistency attack the hash binding was meant to stop.
The policy mod should refuse a model message with more than one ArrayRecord.
"""
import numpy as np
from flwr.app import Message, RecordDict
from guard_attack_helpers import SHAPE, TamperGrid, app, arrays, fedavg, initial, stage

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import GuardedStrategy, SecAgg

N = 3


def test_a_second_arrayrecord_in_the_masked_input_is_refused():
    def tamper(msg):
        if stage(msg) != "masked-input":
            return msg
        content = RecordDict({"announced": msg.content["arrays"]})
        # a per-client model of the server's choosing
        content["arrays"] = arrays(np.full(SHAPE, float(msg.metadata.dst_node_id), np.float32))
        for k, v in msg.content.items():
            if k != "arrays":
                content[k] = v
        return Message(content, msg.metadata.dst_node_id, msg.metadata.message_type,
                       group_id=msg.metadata.group_id)

    seen = []
    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = TamperGrid({n: app(guard.train_mods(), seen=seen) for n in range(11, 11 + N)}, tamper)
    try:
        GuardedStrategy(fedavg(N), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)
    except Exception:
        pass
    trained_on_forged = [node for node, w in seen if np.any(w != 0)]
    accepted = [r for r in grid.received if not r.has_error() and "masked" in r.content.array_records]
    assert not (trained_on_forged and accepted), (
        f"nodes {trained_on_forged} trained on a per-client model that is not the announced one, "
        f"and {len(accepted)} masked inputs were sent")
