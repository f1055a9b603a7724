
"""Distributed DP: each client adds 1/min_contributors of the noise. When fewer than
min_contributors clients survive the masked-input stage, the sum holds too little
noise; the clients then refuse to sign the survivor set, so no share or seed that
unmasks it is revealed (the client, not the server, decides)."""
import pytest
from flwr.app import Context, Message
from guard_attack_helpers import app, fedavg, initial, stage, train_fn
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import DistributedDP, GuardedStrategy, SecAgg

N = 4


@pytest.mark.parametrize("multi_round", [True, False])
def test_clients_do_not_unmask_a_sum_with_fewer_than_min_contributors(multi_round):
    def dropping(msg: Message, context: Context):
        if context.node_id == 14:
            raise RuntimeError("node 14 drops out after the key exchange")
        return train_fn()(msg, context)

    guard = ClientGuard(ClientPolicy(secagg=True, dp="distributed", min_noise_multiplier=1.0))
    grid = LoopbackGrid({n: app(guard.train_mods(), fn=dropping) for n in range(11, 11 + N)})
    strategy = GuardedStrategy(fedavg(N), secagg=SecAgg(timeout=5, multi_round=multi_round),
                               dp=DistributedDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=1.0, clipping_norm=1.0,
                                                min_contributors=N))
    try:
        strategy.start(grid, initial(), num_rounds=1)
    except Exception:
        pass
    unmask_msgs = {m.metadata.message_id for m in grid.sent if stage(m) == "unmask"}
    answered = [r for r in grid.received if not r.has_error()
                and r.metadata.reply_to_message_id in unmask_msgs]
    assert not answered, (
        f"{len(answered)} clients sent unmasking shares for a sum of {N - 1} survivors, "
        f"whose noise was calibrated for min_contributors={N}")
