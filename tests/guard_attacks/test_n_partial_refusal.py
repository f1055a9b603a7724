"""The issue: 'The server refuses to start when its facade lacks what clients require.'
GuardedStrategy stops only when *every* reply of a round is a policy refusal. When most
clients refuse (they require SecAgg+, the server forgot it) and one does not, every
round 'aggregates' the one client that sent its update in the clear, and the run ends
fine: a misconfiguration that should fail, hidden behind ERROR lines."""
from guard_attack_helpers import app, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import GuardedStrategy


def test_a_round_where_most_clients_refuse_the_servers_protections_fails():
    strict, lax = ClientGuard(ClientPolicy(secagg=True)), ClientGuard(ClientPolicy())
    grid = LoopbackGrid({11: app(strict.train_mods()), 12: app(strict.train_mods()),
                         13: app(lax.train_mods())})
    strategy = GuardedStrategy(fedavg(3))
    try:
        strategy.start(grid, initial(), num_rounds=2)
    except Exception:
        return
    raise AssertionError(
        f"run ended fine with {strategy.aggregated_rounds} rounds aggregated from 1 of 3 "
        "clients while 2 of 3 refused the server's protections every round")
