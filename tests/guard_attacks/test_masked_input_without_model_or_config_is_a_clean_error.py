"""A masked-input message without the model, or without the train config: a clean error
reply that names the problem, never an uncaught exception out of the mods."""
import pytest
from flwr.app import Message, RecordDict
from guard_attack_helpers import TamperGrid, app, fedavg, initial, stage

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import GuardedStrategy, SecAgg

N = 3


@pytest.mark.parametrize("drop", ["arrays", "config"])
def test_masked_input_missing_a_record_is_a_clean_refusal(drop):
    def tamper(msg):
        if stage(msg) != "masked-input":
            return msg
        out = RecordDict({k: v for k, v in msg.content.items() if k != drop})
        return Message(out, msg.metadata.dst_node_id, msg.metadata.message_type,
                       group_id=msg.metadata.group_id)

    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = TamperGrid({n: app(guard.train_mods()) for n in range(11, 11 + N)}, tamper)
    try:
        GuardedStrategy(fedavg(N), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)
    except Exception:
        pass
    masked = {m.metadata.message_id for m in grid.sent if stage(m) == "masked-input"}
    reasons = [r.error.reason for r in grid.received
               if r.metadata.reply_to_message_id in masked and r.has_error()]
    assert reasons, "expected refusals"
    crashes = [x for x in reasons if x.split(":")[0] in ("StopIteration", "AttributeError",
                                                        "RuntimeError", "IndexError")]
    assert not crashes, crashes
