"""The issue: 'The server refuses to start when its facade lacks what clients require.'
GuardedStrategy once stopped only when *every* reply of a round was a policy refusal. When most
clients refuse (they require SecAgg+, the server forgot it) and one does not, every
round 'aggregates' the one client that sent its update in the clear, and the run ends
fine: a misconfiguration that should fail, hidden behind ERROR lines."""
import pytest
from guard_attack_helpers import app, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.round_log import GuardMismatch
from flwr_guard.guard.strategy import GuardedStrategy


def test_a_round_where_most_clients_refuse_the_servers_protections_fails():
    strict, lax = ClientGuard(ClientPolicy(secagg=True)), ClientGuard(ClientPolicy())
    grid = LoopbackGrid({11: app(strict.train_mods()), 12: app(strict.train_mods()),
                         13: app(lax.train_mods())})
    strategy = GuardedStrategy(fedavg(3))
    with pytest.raises(GuardMismatch, match=r"round 1: 2 of 3 clients refused the server's protections") as err:
        strategy.start(grid, initial(), num_rounds=2)
    assert "this client requires SecAgg+ but the server's strategy does not run it" in str(err.value)
    assert strategy.aggregated_rounds == 0


def test_the_same_run_completes_when_no_client_requires_what_the_server_lacks():
    # Positive control: the same harness and strategy with clients that require nothing more.
    lax = ClientGuard(ClientPolicy())
    grid = LoopbackGrid({n: app(lax.train_mods()) for n in (11, 12, 13)})
    strategy = GuardedStrategy(fedavg(3))
    strategy.start(grid, initial(), num_rounds=2)
    assert strategy.aggregated_rounds == 2


def test_one_client_of_four_refusing_is_left_out_and_cannot_end_the_run(caplog):
    # A minority refusal (real here; a malicious client could claim one falsely) is an
    # ERROR line per round and that client's reply is left out; the others' rounds go on.
    import logging

    strict, lax = ClientGuard(ClientPolicy(secagg=True)), ClientGuard(ClientPolicy())
    grid = LoopbackGrid({11: app(strict.train_mods()), **{n: app(lax.train_mods()) for n in (12, 13, 14)}})
    strategy = GuardedStrategy(fedavg(4))
    with caplog.at_level(logging.ERROR):
        strategy.start(grid, initial(), num_rounds=2)
    assert strategy.aggregated_rounds == 2
    refused = [r.getMessage() for r in caplog.records if "node 11 refused" in r.getMessage()]
    assert len(refused) == 2 and "requires SecAgg+" in refused[0]


def test_one_client_of_two_refusing_cannot_end_the_run():
    # Half is not a majority: with two clients, one refusal (true or claimed) is left out.
    strict, lax = ClientGuard(ClientPolicy(secagg=True)), ClientGuard(ClientPolicy())
    grid = LoopbackGrid({11: app(strict.train_mods()), 12: app(lax.train_mods())})
    strategy = GuardedStrategy(fedavg(2))
    strategy.start(grid, initial(), num_rounds=2)
    assert strategy.aggregated_rounds == 2
