"""DP-SGD helper: the Opacus ledger composes over rounds and across a client restart
(the ledger lives in context.state), clear errors, ghost clipping, the clipping mod."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.dp.context_state import (
    STATE_KEY,
    dpsgd_from_context,
    load_accountant_state,
    save_dpsgd,
)
from flwr_guard.dp.dpsgd import DPSGD, DPSGDConfig, DPSGDModelError, resolve_device
from flwr_guard.dp.mods import update_clipping_mod

RUN_CONFIG = {"dp-sgd-noise-multiplier": 1.2, "dp-sgd-max-grad-norm": 1.0, "dp-sgd-delta": 1e-4}


def _data(n: int = 160) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=32,
    )


def _round(context: Context) -> DPSGD:
    """One round of a client: what a fresh ClientApp process does with its context."""
    dpsgd = dpsgd_from_context(context)
    model = DigitsCNN()
    private = dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        private.criterion(private.module(x), y).backward()
        private.optimizer.step()
    save_dpsgd(context, dpsgd)
    return dpsgd


def _context(state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=state or RecordDict(),
                   run_config=dict(RUN_CONFIG))


def test_ledger_composes_over_rounds_and_across_a_client_restart() -> None:
    context = _context()
    first = _round(context)
    assert first.steps == 5 and first.epsilon() > 0  # 160 examples / batch 32
    second = _round(context)
    assert second.steps == 10 and second.epsilon() > first.epsilon()

    # Restart: a new process gets a new Context carrying only the saved state records.
    saved = RecordDict({STATE_KEY: context.state.config_records[STATE_KEY]})
    restarted = _context(saved)
    third = _round(restarted)
    assert third.steps == 15
    # Same epsilon as one Opacus accountant that saw all 15 steps (q = 32 / 160).
    reference = RDPAccountant()
    reference.history = [(1.2, 0.2, 15)]
    assert third.epsilon() == pytest.approx(reference.get_epsilon(1e-4), rel=1e-9)
    assert load_accountant_state(restarted)["history"] == [(1.2, 0.2, 15)]


def test_a_fresh_accountant_per_round_would_forget_the_past() -> None:
    # What the helper prevents: without context.state each round starts from zero.
    forgetful = [_round(_context()) for _ in range(2)]
    assert forgetful[1].steps == 5 and forgetful[1].epsilon() == pytest.approx(forgetful[0].epsilon())


def test_batchnorm_model_gets_an_error_naming_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    dpsgd = DPSGD(DPSGDConfig(1.0, 1.0))
    with pytest.raises(DPSGDModelError, match=r"ModuleValidator\.fix"):
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())


def test_ghost_clipping_trains_and_accounts_like_standard_dpsgd() -> None:
    torch.manual_seed(0)
    config = DPSGDConfig.from_run_config({**RUN_CONFIG, "dp-sgd-ghost-clipping": True})
    assert config.grad_sample_mode == "ghost"
    dpsgd = DPSGD(config)
    model = DigitsCNN()
    before = [p.detach().clone() for p in model.parameters()]
    private = dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        private.criterion(private.module(x), y).backward()
        private.optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert dpsgd.steps == 5
    with pytest.raises(RuntimeError, match="already called"):
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())


def test_run_config_and_device_errors_are_clear() -> None:
    with pytest.raises(KeyError, match="dp-sgd-max-grad-norm"):
        DPSGDConfig.from_run_config({"dp-sgd-noise-multiplier": 1.0})
    with pytest.raises(ValueError, match="max grad norm"):
        DPSGDConfig(1.0, 0.0)
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cuda").type == expected


@pytest.fixture
def server_process() -> object:
    """Flower 1.41 creates messages only in a process with a task identity (run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _train_message(global_arrays: list[np.ndarray], config: dict) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({f"w{i}": Array(a) for i, a in enumerate(global_arrays)}),
        "config": ConfigRecord(config),
    })
    return Message(content=content, dst_node_id=3, message_type="train")


def _client(local: list[np.ndarray]):
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({f"w{i}": Array(a) for i, a in enumerate(local)})
        metrics = MetricRecord({"train-loss": 0.5, "num-examples": 10})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    return train


def test_clipping_mod_clips_the_update_and_keeps_fedavgs_contract(server_process) -> None:
    global_arrays = [np.ones((3, 4), np.float32), np.zeros(5, np.float32)]
    local = [g + 2.0 for g in global_arrays]  # update norm 2 * sqrt(17)
    msg = _train_message(global_arrays, {"dp-clipping-norm": 1.0, "dp-adaptive-clipping": True,
                                         "dp-weight-key": "num-examples"})
    reply = update_clipping_mod(msg, _context(), _client(local))
    assert not reply.has_error()
    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
    out = reply.content["arrays"].to_numpy_ndarrays()
    update = [o.astype(np.float64) - g for o, g in zip(out, global_arrays)]
    assert np.sqrt(sum((u ** 2).sum() for u in update)) == pytest.approx(1.0, rel=1e-5)
    assert [o.dtype for o in out] == [np.float32, np.float32]
    metrics = reply.content["metrics"]
    # Every client weighs 1 (uniform mean); the bit says the update was clipped.
    assert metrics["num-examples"] == 1.0 and metrics["dp-unclipped-count"] == 0.0
    assert metrics["train-loss"] == 0.5 and "norm" not in " ".join(metrics.keys())

    small = [g + 0.01 for g in global_arrays]
    fixed = _train_message(global_arrays, {"dp-clipping-norm": 1.0})
    reply = update_clipping_mod(fixed, _context(), _client(small))
    assert "dp-unclipped-count" not in reply.content["metrics"]  # fixed clipping: no bit
    assert reply.content["metrics"]["num-examples"] == 10  # no weight key sent: untouched
    np.testing.assert_allclose(reply.content["arrays"].to_numpy_ndarrays()[0], small[0])


def test_clipping_mod_refuses_without_a_clipping_norm_or_with_bad_replies(server_process) -> None:
    global_arrays = [np.ones(3, np.float32)]
    reply = update_clipping_mod(_train_message(global_arrays, {}), _context(), _client(global_arrays))
    assert reply.has_error() and "DPFedAvg" in reply.error.reason
    nan = [np.array([np.nan, 1, 1], np.float32)]
    msg = _train_message(global_arrays, {"dp-clipping-norm": 1.0})
    reply = update_clipping_mod(msg, _context(), _client(nan))
    assert reply.has_error() and "non-finite" in reply.error.reason
    wrong = [np.ones(4, np.float32)]
    reply = update_clipping_mod(msg, _context(), _client(wrong))
    assert reply.has_error() and "shapes" in reply.error.reason
