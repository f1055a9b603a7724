"""A cohort of one honest client and one Sybil: the node's own SecAgg+ floor refuses it.

The SecAgg+ floors (smallest cohort, k, t, the federation roster) are the node
operator's, in node config (flwr_guard.secagg.policy; docs/secagg.md): the app code,
ClientGuard included, travels in the FAB that the run's submitter sends, the node config
does not. A server that samples one real client with one node of its own (k=1, t=1)
would learn that client's update exactly from the 'sum'.
"""

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from guard_attack_helpers import app, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import GuardedStrategy, SecAgg
from flwr_guard.secagg.mod import secaggplus_mod


def _sybil(msg, context):  # the server's own node: sends a zero update
    return Message(RecordDict({"arrays": msg.content["arrays"],
                               "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


def test_two_node_cohort_with_a_sybil_is_refused():
    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = LoopbackGrid({11: app(guard.train_mods(), step=0.5), 12: app([secaggplus_mod], fn=_sybil)},
                        node_config={11: {"secagg-min-cohort": 3}})  # the default floor
    try:
        result = GuardedStrategy(fedavg(2), secagg=SecAgg(timeout=5)).start(
            grid, initial(), num_rounds=1)
    except Exception as err:  # refused, and for the right reason
        assert "aborted at advertise" in str(err), err  # the client refused to advertise
        return
    recovered = 2 * result.arrays["w"].numpy()
    true_update = 0.5 * (1 + 11 % 3)
    assert not np.allclose(recovered, true_update, atol=1e-3), (
        "the server recovered node 11's exact update from a 2-node SecAgg+ 'sum' "
        f"(recovered {recovered.ravel()[0]:.4f}, true {true_update})")
