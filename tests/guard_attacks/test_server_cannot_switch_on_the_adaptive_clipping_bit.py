"""A server that runs distributed DP (fixed clipping, as GuardedStrategy insists) flips
'dp-adaptive-clipping' on in the masked-input config. update_clipping_mod then writes
Andrew et al.'s per-client bit 1[||update|| <= C] into the metrics, and since the server
did not list it in masked_metrics, the SecAgg+ mod sends it in the clear next to the
masked vector: a per-client statistic of the data, un-noised, unmasked. The policy
checks neither the flag against manifest.dp.adaptive nor that the bit is masked."""
from flwr.app import ConfigRecord, Message, RecordDict
from guard_attack_helpers import TamperGrid, app, fedavg, initial, stage

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import DistributedDP, GuardedStrategy, SecAgg

N = 3


def test_unclipped_bit_never_travels_in_the_clear():
    def tamper(msg):
        if stage(msg) != "masked-input":
            return msg
        out = RecordDict(dict(msg.content.items()))
        cfg = ConfigRecord(dict(msg.content["config"]))
        cfg["dp-adaptive-clipping"] = True
        out["config"] = cfg
        return Message(out, msg.metadata.dst_node_id, msg.metadata.message_type,
                       group_id=msg.metadata.group_id)

    guard = ClientGuard(ClientPolicy(secagg=True, dp="distributed", min_noise_multiplier=1.0))
    grid = TamperGrid({n: app(guard.train_mods()) for n in range(11, 11 + N)}, tamper)
    strategy = GuardedStrategy(fedavg(N), secagg=SecAgg(timeout=5),
                               dp=DistributedDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=1.0, clipping_norm=1.0, min_contributors=N))
    try:
        strategy.start(grid, initial(), num_rounds=1)
    except Exception:
        pass
    leaked = {r.metadata.src_node_id: m["dp-unclipped-count"]
              for r in grid.received if not r.has_error()
              for m in r.content.metric_records.values() if "dp-unclipped-count" in m}
    assert not leaked, f"per-client clipping bits sent in the clear: {leaked}"
