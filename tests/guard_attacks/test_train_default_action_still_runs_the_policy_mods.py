"""A malicious server addresses the default train function as 'train.default'.

Flower routes 'train.default' to the function registered by @app.train(mods=...), with
the guard's mods, but every guard mod tests `message_type == "train"` and lets it
through: the update goes out in the clear although the policy requires SecAgg+.
"""
from flwr.app import ConfigRecord, RecordDict
from guard_attack_helpers import app, clear_updates, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard


def _send(grid, message_type):
    content = RecordDict({"arrays": initial(), "config": ConfigRecord({"lr": 0.1})})
    msg = grid.create_message(content, message_type, 11, "1")
    return list(grid.send_and_receive([msg]))


def test_train_default_action_does_not_bypass_the_policy():
    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = LoopbackGrid({11: app(guard.train_mods())})
    [reply] = _send(grid, "train")
    assert reply.has_error()  # the plain "train" type is refused, as designed
    [reply] = _send(grid, "train.default")
    assert reply.has_error(), (
        "'train.default' reached the guarded train function with every guard mod bypassed; "
        f"reply arrays in the clear: {list(reply.content.array_records)}")
    assert clear_updates(grid) == []


def test_named_train_action_is_guarded_too():
    # A user who registers @app.train("fit", mods=guard.train_mods()) gets no protection.
    from flwr.clientapp import ClientApp
    from guard_attack_helpers import train_fn

    guard = ClientGuard(ClientPolicy(secagg=True))
    a = ClientApp()
    a.train("fit", mods=guard.train_mods())(train_fn())
    grid = LoopbackGrid({11: a})
    [reply] = _send(grid, "train.fit")
    assert reply.has_error(), "a named train action is not guarded: update sent in the clear"


def test_train_default_does_not_bypass_update_clipping():
    import numpy as np
    guard = ClientGuard(ClientPolicy(dp="central", max_clipping_norm=0.01))
    grid = LoopbackGrid({11: app(guard.train_mods(), step=1.0)})
    [reply] = _send(grid, "train.default")  # no manifest, no clipping norm at all
    assert reply.has_error(), (
        "unclipped update of norm "
        f"{np.linalg.norm(reply.content['arrays']['w'].numpy()):.2f} sent without any manifest")
