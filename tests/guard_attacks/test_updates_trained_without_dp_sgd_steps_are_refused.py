"""DP-SGD as the client's policy requires it (ClientGuard(dpsgd=...)).

The policy mod only checks that private_training's `with` block exited cleanly; it does
not check that any DP-SGD step was taken. A train function that trains with the
original optimizer (or outside the block) is let out as 'trained under DP-SGD'.
"""
import inspect

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from guard_attack_helpers import SHAPE, arrays, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import GuardedStrategy, NoAggregate

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from flwr_guard.dp.dpsgd import DPSGDConfig  # noqa: E402

REFUSAL = "no DP-SGD step was taken inside private_training"


def _run(guard, body):
    """One round on two clients; returns (grid, the exception that ended the run or None)."""
    data = TensorDataset(torch.randn(64, SHAPE[1]), torch.randint(0, SHAPE[0], (64,)))

    def train(msg: Message, context: Context) -> Message:
        model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
        model.weight.data = torch.tensor(msg.content["arrays"]["w"].numpy())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(data, batch_size=16)
        body(guard, context, model, opt, loader)
        w = model.weight.detach().numpy().astype(np.float32)
        return Message(RecordDict({"arrays": arrays(w), "metrics": MetricRecord({"num-examples": 64})}),
                       reply_to=msg)

    apps = {}
    for node in (1, 2):
        a = ClientApp()
        a.train(mods=guard.train_mods())(train)
        apps[node] = a
    grid = LoopbackGrid(apps)
    try:
        GuardedStrategy(fedavg(2)).start(grid, initial(), num_rounds=1)
    except NoAggregate as err:  # every client refused: the run fails, it does not end "completed"
        return grid, err
    return grid, None


def _assert_every_reply_refused_for_no_dpsgd_step(grid, error):
    assert len(grid.received) == 2
    reasons = [r.error.reason for r in grid.received if r.has_error()]
    assert len(reasons) == 2, "an update trained without DP-SGD was sent"
    assert all(REFUSAL in reason for reason in reasons), reasons
    assert isinstance(error, NoAggregate)


def test_private_training_with_dp_sgd_steps_sends_its_update():
    # Positive control: the same harness, trained through the yielded DP optimizer, sends.
    guard = ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))

    def body(guard, context, model, opt, loader):
        with guard.private_training(context, model, opt, loader, epochs=1) as dp:
            dp.fit("cpu")

    grid, error = _run(guard, body)
    assert error is None
    assert len(grid.received) == 2 and not any(r.has_error() for r in grid.received)


def _plain_sgd(model, opt, loader):
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_empty_private_block_then_plain_training_is_refused():
    guard = ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))

    def body(guard, context, model, opt, loader):
        with guard.private_training(context, model, opt, loader, epochs=1):
            pass
        _plain_sgd(model, opt, loader)  # outside the block

    _assert_every_reply_refused_for_no_dpsgd_step(*_run(guard, body))


def test_original_optimizer_inside_the_block_is_refused():
    guard = ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))

    def body(guard, context, model, opt, loader):
        with guard.private_training(context, model, opt, loader, epochs=1) as dp:
            for x, y in dp.batches():
                opt.zero_grad()  # the user's original optimizer, not dp.optimizer
                dp.criterion(dp.module(x), y).backward()
                opt.original_optimizer.step() if hasattr(opt, "original_optimizer") else opt.step()
                break  # one batch: Opacus' own grad-accumulation check never fires

    _assert_every_reply_refused_for_no_dpsgd_step(*_run(guard, body))


def test_dpsgd_without_noise_is_not_accepted_as_dp_sgd():
    with pytest.raises(ValueError, match="DP-SGD needs a noise multiplier > 0, got 0.0"):
        ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=0.0, max_grad_norm=1.0))


def test_the_guard_can_enforce_a_record_level_budget():
    params = set(inspect.signature(DPSGDConfig).parameters) | set(inspect.signature(ClientGuard).parameters)
    assert params & {"max_epsilon", "budget", "epsilon_budget"}, (
        f"no record-level budget anywhere in ClientGuard/DPSGDConfig: {sorted(params)}")
