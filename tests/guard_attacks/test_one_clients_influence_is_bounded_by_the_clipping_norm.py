"""The manifest (and the server's log) claims 'update-clipping' and a user-level epsilon
whenever dp= is given, but ClientGuard adds update_clipping_mod only when the *client's*
policy requires DP. A client whose policy does not (ClientPolicy(secagg=True), the
quickstart's policy) sends unclipped updates; under SecAgg+ DPFedAvg can only clip the
masked *mean*, which bounds one client's influence by 2C instead of 2C/n: the noise
(z*C on the sum) is n times too small for the epsilon the run reports, and the run ends
fine. Measured as the sensitivity to one client: two runs that differ only in node 13's
update.
"""
import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from guard_attack_helpers import app, arrays, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import CentralDP, GuardedStrategy, SecAgg
from flwr_guard.secagg.mod import secaggplus_mod

N, C, S = 3, 0.1, 0.5


def _signed_train(signs, claims=None):
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy() + S * signs[context.node_id]
        metrics = MetricRecord({"num-examples": 10, **(claims or {})})
        return Message(RecordDict({"arrays": arrays(w), "metrics": metrics}), reply_to=msg)
    return train


def _aggregate(mods, signs, claims=None):
    # z = 1e-6 (the exact influence shows): below the node's default floor, so lowered here.
    grid = LoopbackGrid({n: app(mods, fn=_signed_train(signs, claims)) for n in signs},
                        node_config={n: {"dp-min-noise-multiplier": 1e-6} for n in signs})
    strategy = GuardedStrategy(fedavg(N), secagg=SecAgg(timeout=5),
                               dp=CentralDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=1e-6, clipping_norm=C))
    assert strategy.manifest.has("update-clipping")
    return strategy.start(grid, initial(), num_rounds=1).arrays["w"].numpy()


@pytest.mark.parametrize("policy", [ClientPolicy(secagg=True, dp="central"), ClientPolicy(secagg=True)],
                         ids=["client-requires-dp", "client-policy-without-dp"])
def test_one_clients_influence_is_bounded_by_the_announced_clipping(policy):
    a = _aggregate(ClientGuard(policy).train_mods(), {11: 1, 12: -1, 13: 1})
    b = _aggregate(ClientGuard(policy).train_mods(), {11: 1, 12: -1, 13: -1})
    influence = float(np.linalg.norm(a - b))
    assert influence <= 2 * C / N * 1.01, (
        f"one client moved the DP aggregate by {influence:.3f}, more than 2C/n = {2 * C / N:.3f} "
        "that the manifest's 'update-clipping' and the reported epsilon assume; the run ended fine")


def test_without_client_side_clipping_one_client_moves_the_aggregate_past_2c_over_n():
    # Positive control: clients that run the bare SecAgg+ mod and claim the clipping counts
    # the server checks, without clipping, move the aggregate far past 2C/n.
    claims = {"num-examples": 1, "dp-clipped-count": 1, "dp-noised-count": 0, "dp-unclipped-count": 0}
    a = _aggregate([secaggplus_mod], {11: 1, 12: -1, 13: 1}, claims)
    b = _aggregate([secaggplus_mod], {11: 1, 12: -1, 13: -1}, claims)
    assert float(np.linalg.norm(a - b)) > 2 * 2 * C / N
