"""DP-SGD helper: the ledger composes over rounds, across a ClientApp restart
(context.state) and a SuperNode restart (the durable node-local ledger); the library
enforces the record-level budget; clear errors, ghost clipping, the clipping mod."""

from __future__ import annotations

import json
import math

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
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.dp.budget import PrivacyBudgetExceeded
from flwr_guard.dp.context_state import (
    STATE_KEY,
    dpsgd_from_context,
    load_accountant_state,
    save_dpsgd,
)
from flwr_guard.dp.dpsgd import DPSGD, DPSGDConfig, DPSGDModelError, resolve_device
from flwr_guard.dp.mods import update_clipping_mod
from flwr_guard.dp.record_ledger import LedgerCorrupt, LedgerMissing, RecordLedger, init_ledger

RUN_CONFIG = {"dp-sgd-noise-multiplier": 1.2, "dp-sgd-max-grad-norm": 1.0, "dp-sgd-delta": 1e-4}


def _data(n: int = 160) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=32,
    )


def _round(context: Context, epochs: int = 1, data: DataLoader | None = None) -> DPSGD:
    """One round of a client: what a fresh ClientApp process does with its context."""
    dpsgd = dpsgd_from_context(context, epochs=epochs)
    model = DigitsCNN()
    private = dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 data or _data())
    for _ in range(epochs):
        for x, y in private.data_loader:
            if len(y) == 0:
                continue
            private.optimizer.zero_grad()
            private.criterion(private.module(x), y).backward()
            private.optimizer.step()
    save_dpsgd(context, dpsgd)
    return dpsgd


@pytest.fixture
def ledger_dir(tmp_path):
    """The node's ledger directory, with the ledger of its default data source created
    as the operator would (`flwr-guard ledger init`)."""
    init_ledger(tmp_path / "ledger", "default")
    return tmp_path / "ledger"


def _context(ledger_dir, state: RecordDict | None = None, run: dict | None = None,
             **node) -> Context:
    return Context(run_id=1, node_id=7, node_config={"dp-sgd-ledger": str(ledger_dir), **node},
                   state=state or RecordDict(), run_config={**RUN_CONFIG, **(run or {})})


def _rdp(history, delta=1e-4) -> float:
    reference = RDPAccountant()
    reference.history = list(history)
    return reference.get_epsilon(delta)


def test_ledger_composes_over_rounds_and_across_a_client_restart(ledger_dir) -> None:
    context = _context(ledger_dir)
    first = _round(context)
    assert first.steps == 5 and first.epsilon() > 0  # 160 examples / batch 32
    second = _round(context)
    assert second.steps == 10 and second.epsilon() > first.epsilon()

    # ClientApp restart: a new process gets a new Context carrying the state records.
    saved = RecordDict({STATE_KEY: context.state.config_records[STATE_KEY]})
    restarted = _context(ledger_dir, saved)
    third = _round(restarted)
    assert third.steps == 15
    # Same epsilon as one Opacus accountant that saw all 15 steps (q = 32 / 160).
    assert third.epsilon() == pytest.approx(_rdp([(1.2, 0.2, 15)]), rel=1e-9)
    assert load_accountant_state(restarted)["history"] == [(1.2, 0.2, 15)]


def test_supernode_restart_continues_the_durable_ledger_and_the_budget_stops_training(
    ledger_dir,
) -> None:
    # Budget: 2 rounds of 2 epochs (20 steps at q = 0.2) fit, the third does not.
    eps = [_rdp([(1.2, 0.2, 10 * r)]) for r in (1, 2, 3)]
    run = {"dp-sgd-max-epsilon": (eps[1] + eps[2]) / 2}
    first = _round(_context(ledger_dir, run=run), epochs=2)
    assert first.steps == 10
    # SuperNode restart: context.state is empty (Flower keeps it in memory), same
    # ledger path. The durable ledger continues: epsilon does not reset to 0.
    second = _round(_context(ledger_dir, run=run), epochs=2)
    assert second.steps == 20 and second.epsilon() == pytest.approx(eps[1], rel=1e-9)
    on_disk = json.loads((ledger_dir / "default.json").read_text())
    assert on_disk["history"] == [[1.2, 0.2, 20]] and on_disk["node-ids"] == [7]
    # Another restart: round 3 would exceed the budget and is refused before training.
    context = _context(ledger_dir, run=run)
    model = DigitsCNN()
    before = [p.detach().clone() for p in model.parameters()]
    dpsgd = dpsgd_from_context(context, epochs=2)
    with pytest.raises(PrivacyBudgetExceeded, match="record-level privacy budget exhausted"):
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert json.loads((ledger_dir / "default.json").read_text())["history"] == [[1.2, 0.2, 20]]
    # Other records of the same source (a subset, another order) spend the same ledger.
    with pytest.raises(PrivacyBudgetExceeded, match="record-level privacy budget exhausted"):
        _round(_context(ledger_dir, run=run), epochs=2, data=_data(n=96))
    # Another data source, declared by the operator, has its own (once created).
    init_ledger(ledger_dir, "scans-2024")
    other = _round(_context(ledger_dir, run=run, **{"dp-sgd-data-source": "scans-2024"}),
                   epochs=2, data=_data(n=96))
    assert other.steps == 6


def test_budget_uses_the_configured_accountant(ledger_dir) -> None:
    prv = PRVAccountant()
    prv.history = [(1.2, 0.2, 10)]
    eps_prv = prv.get_epsilon(1e-4)
    assert eps_prv < _rdp([(1.2, 0.2, 10)])  # the budget below is between the two
    run = {"dp-sgd-accountant": "prv", "dp-sgd-max-epsilon": (eps_prv + _rdp([(1.2, 0.2, 10)])) / 2}
    dpsgd = _round(_context(ledger_dir, run=run), epochs=2)
    assert dpsgd.epsilon() == pytest.approx(eps_prv, rel=1e-6)


def test_missing_deleted_or_corrupt_ledger_is_refused_naming_the_init_command(ledger_dir,
                                                                               tmp_path) -> None:
    command = f"flwr-guard ledger init --dir {ledger_dir} --source"
    # A node whose operator never created the ledger refuses DP-SGD.
    with pytest.raises(LedgerMissing, match=f"{command} partition-3`"):
        _round(_context(ledger_dir, **{"partition-id": 3}))
    assert not (ledger_dir / "partition-3.json").exists()  # nothing created

    context = _context(ledger_dir)
    _round(context)
    (ledger_dir / "default.json").unlink()
    # Deleted: refused in the same process, after a restart (empty context.state) and
    # in a new run whose run config differs (new seed).
    with pytest.raises(LedgerMissing, match=f"{command} default`"):
        _round(context)
    with pytest.raises(LedgerMissing, match=f"{command} default`"):
        _round(_context(ledger_dir))
    new_run = Context(run_id=2, node_id=8, node_config={"dp-sgd-ledger": str(ledger_dir)},
                      state=RecordDict(), run_config={**RUN_CONFIG, "seed": 43})
    with pytest.raises(LedgerMissing, match=f"{command} default`"):
        _round(new_run)
    assert not (ledger_dir / "default.json").exists()
    # The removed reset key is refused, naming the command that replaces it.
    with pytest.raises(ValueError, match="dp-sgd-ledger-reset is no longer read.*--force"):
        _round(_context(ledger_dir, **{"dp-sgd-ledger-reset": True}))

    # Re-created by the operator, but the node's memory says it spent more: refused.
    init_ledger(ledger_dir, "default")
    with pytest.raises(LedgerMissing, match="older copy.*--force"):
        _round(context)
    # A ledger rolled back to an older copy than the node's memory is refused too.
    path = ledger_dir / "default.json"
    older = {**json.loads(path.read_text()), "history": [[1.2, 0.2, 3]]}
    path.write_text(json.dumps(older))
    assert RecordLedger(ledger_dir, "default").steps == 3
    with pytest.raises(LedgerMissing, match="older copy"):
        _round(context)
    # A corrupt ledger is an error naming the command, never a fresh start, never rewritten.
    for corrupt in ("{not json", json.dumps({"version": 1, "history": []}),
                    json.dumps({**older, "source": "elsewhere"})):
        path.write_text(corrupt)
        with pytest.raises(LedgerCorrupt, match=f"{command} default --force"):
            _round(_context(ledger_dir))
        assert path.read_text() == corrupt


def test_a_new_seed_or_subset_does_not_give_the_node_a_fresh_budget(tmp_path) -> None:
    """The issue's measurement, with the reference app's own data loading: a budget
    where two rounds fit and the third does not; a new run with seed 43 trains on a
    different (largely overlapping) subset of the node's records and is refused too
    (before: a fresh ledger, keyed by the training set's fingerprint)."""
    from flwr_guard.apps.digits.data import node_partition_arrays, to_tensor_dataset

    node = {"partition-id": 0, "num-partitions": 2, "dp-sgd-ledger": str(tmp_path / "l")}
    init_ledger(tmp_path / "l", "partition-0")  # the operator's one command
    data_config = {"partitioner": "iid", "dirichlet-alpha": 0.5, "test-fraction": 0.2}

    def loader(seed: int) -> DataLoader:
        images, labels = node_partition_arrays({**data_config, "seed": seed}, node)
        return DataLoader(to_tensor_dataset(images, labels), batch_size=64)

    steps = len(loader(42))
    eps = [_rdp([(1.5, 1 / steps, steps * r)], delta=1e-5) for r in (2, 3)]
    run = {**RUN_CONFIG, "dp-sgd-noise-multiplier": 1.5, "dp-sgd-delta": 1e-5,
           "dp-sgd-max-epsilon": sum(eps) / 2}

    def context(run_id: int, seed: int) -> Context:
        return Context(run_id=run_id, node_id=run_id, node_config=node, state=RecordDict(),
                       run_config={**run, "seed": seed})

    first = context(1, 42)
    spent = []
    for _ in range(2):
        spent.append(_round(first, epochs=1, data=loader(42)).epsilon())
    with pytest.raises(PrivacyBudgetExceeded, match=f"from {spent[-1]:.4g}"):
        _round(first, epochs=1, data=loader(42))
    overlap = {tuple(x.flatten().tolist()) for x, _ in loader(42).dataset} & {
        tuple(x.flatten().tolist()) for x, _ in loader(43).dataset}
    assert len(overlap) > 0.5 * len(loader(43).dataset)  # records used in both runs
    with pytest.raises(PrivacyBudgetExceeded, match=f"from {spent[-1]:.4g}"):
        _round(context(2, 43), epochs=1, data=loader(43))
    history = json.loads((tmp_path / "l" / "partition-0.json").read_text())["history"]
    assert sum(n for _, _, n in history) == 2 * steps  # the refusals wrote nothing
    assert len(loader(43)) == steps  # same rate: seed 43 alone would have fitted twice


def test_a_node_with_empty_node_config_refuses_an_unbounded_budget_and_zero_noise(
    tmp_path, monkeypatch,
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    init_ledger(tmp_path / "home" / "flwr-guard" / "dp-sgd-ledger", "default")

    def context(**run) -> Context:
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                       run_config={**RUN_CONFIG, **run})

    # No budget in the run config (0 = "no limit"): the node's default cap, 10.
    assert dpsgd_from_context(context(**{"dp-sgd-max-epsilon": 0.0})).config.max_epsilon == 10.0
    assert dpsgd_from_context(context(**{"dp-sgd-max-epsilon": 1e9})).config.max_epsilon == 10.0
    # The app's own config cannot loosen it either.
    app = DPSGDConfig(noise_multiplier=1.2, max_grad_norm=1.0, max_epsilon=math.inf)
    assert dpsgd_from_context(context(), app).config.max_epsilon == 10.0
    # Zero noise and the 0.3 are below the default floor 0.5: refused.
    for z in (0.0, 0.3):
        with pytest.raises(ValueError, match=f"noise multiplier {z:g}, below this node's floor "
                                             "dp-sgd-min-noise-multiplier=0.5"):
            dpsgd_from_context(context(**{"dp-sgd-noise-multiplier": z}))
        with pytest.raises(ValueError, match="the app asks for DP-SGD noise multiplier"):
            dpsgd_from_context(context(), DPSGDConfig(noise_multiplier=z, max_grad_norm=1.0))
    # A round that would pass the default cap is refused before any data is touched.
    dpsgd = dpsgd_from_context(context(**{"dp-sgd-noise-multiplier": 0.6}), epochs=50)
    model = DigitsCNN()
    with pytest.raises(PrivacyBudgetExceeded, match="> max epsilon 10 "):
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())


def test_empty_poisson_batches_enter_the_ledger(ledger_dir) -> None:
    # 4 examples, expected batch 1: q = 1/4, 4 steps per epoch; an empty batch has
    # probability (3/4)^4 = 0.32, so 5 epochs (20 steps) hold some almost surely.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tiny = DataLoader(TensorDataset(torch.rand(4, 1, 8, 8, generator=g), torch.arange(4)),
                      batch_size=1)
    dpsgd = _round(_context(ledger_dir), epochs=5, data=tiny)
    assert dpsgd.realised_steps < 20 == dpsgd.steps
    assert dpsgd.epsilon() == pytest.approx(_rdp([(1.2, 0.25, 20)]), rel=1e-9)


def test_node_policy_bounds_the_run_config(ledger_dir) -> None:
    node = {"dp-sgd-max-epsilon": 2.0, "dp-sgd-min-noise-multiplier": 1.0}
    # The server's run config asks for a larger budget: the node's wins.
    config = DPSGDConfig.from_run_config({**RUN_CONFIG, "dp-sgd-max-epsilon": 50.0}, node_config=node)
    assert config.max_epsilon == 2.0
    assert DPSGDConfig.from_run_config(RUN_CONFIG, node_config=node).max_epsilon == 2.0
    with pytest.raises(ValueError, match="below this node's floor dp-sgd-min-noise-multiplier=1"):
        DPSGDConfig.from_run_config({**RUN_CONFIG, "dp-sgd-noise-multiplier": 0.9}, node_config=node)
    # Secure mode is reachable from the run config; without torchcsprng it is an error
    # naming the fix, never a silent fallback to the default RNG.
    config = DPSGDConfig.from_run_config({**RUN_CONFIG, "dp-sgd-secure-mode": True})
    assert config.secure_mode
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="torchcsprng"):
            DPSGD(config)
    with pytest.raises(ValueError, match="epochs"):
        dpsgd = dpsgd_from_context(_context(ledger_dir, run={"dp-sgd-max-epsilon": 5.0}))
        model = DigitsCNN()
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())


def test_batchnorm_model_gets_an_error_naming_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    dpsgd = DPSGD(DPSGDConfig(1.0, 1.0))
    with pytest.raises(DPSGDModelError, match=r"ModuleValidator\.fix"):
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())


def test_ghost_clipping_trains_and_accounts_like_standard_dpsgd() -> None:
    torch.manual_seed(0)
    config = DPSGDConfig.from_run_config({**RUN_CONFIG, "dp-sgd-ghost-clipping": True})
    assert config.grad_sample_mode == "ghost" and config.max_epsilon == 10.0  # node default
    dpsgd = DPSGD(config, epochs=1)
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
    reply = update_clipping_mod(msg, _context("unused"), _client(local))
    assert not reply.has_error()
    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
    out = reply.content["arrays"].to_numpy_ndarrays()
    update = [o.astype(np.float64) - g for o, g in zip(out, global_arrays)]
    assert np.sqrt(sum((u ** 2).sum() for u in update)) == pytest.approx(1.0, rel=1e-5)
    assert [o.dtype for o in out] == [np.float32, np.float32]
    metrics = reply.content["metrics"]
    # Every client weighs 1 (uniform mean); the bit says the update was clipped; the
    # clipped count (1) proves the mod ran; the noised count waits for SecAgg+'s mod.
    assert metrics["num-examples"] == 1.0 and metrics["dp-unclipped-count"] == 0
    assert metrics["dp-clipped-count"] == 1 and metrics["dp-noised-count"] == 0
    assert metrics["train-loss"] == 0.5 and "norm" not in " ".join(metrics.keys())

    small = [g + 0.01 for g in global_arrays]
    fixed = _train_message(global_arrays, {"dp-clipping-norm": 1.0})
    reply = update_clipping_mod(fixed, _context("unused"), _client(small))
    assert reply.content["metrics"]["dp-unclipped-count"] == 0  # fixed clipping: bit 0
    assert reply.content["metrics"]["num-examples"] == 10  # no weight key sent: untouched
    np.testing.assert_allclose(reply.content["arrays"].to_numpy_ndarrays()[0], small[0])


def test_clipping_mod_refuses_without_a_clipping_norm_or_with_bad_replies(server_process) -> None:
    global_arrays = [np.ones(3, np.float32)]
    reply = update_clipping_mod(_train_message(global_arrays, {}), _context("unused"), _client(global_arrays))
    assert reply.has_error() and "DPFedAvg" in reply.error.reason
    nan = [np.array([np.nan, 1, 1], np.float32)]
    msg = _train_message(global_arrays, {"dp-clipping-norm": 1.0})
    reply = update_clipping_mod(msg, _context("unused"), _client(nan))
    assert reply.has_error() and "non-finite" in reply.error.reason
    wrong = [np.ones(4, np.float32)]
    reply = update_clipping_mod(msg, _context("unused"), _client(wrong))
    assert reply.has_error() and "shape" in reply.error.reason


def test_importing_dpsgd_does_not_double_flowers_log_lines() -> None:
    import subprocess
    import sys

    code = ("import logging, flwr_guard.dp.dpsgd\n"
            "from flwr.common import log\nlog(logging.INFO, 'one line')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (out.stdout + out.stderr).count("one line") == 1, out.stderr


def test_the_node_shows_its_policy_digest_and_epsilon_spent_of_its_budget(ledger_dir) -> None:
    from flwr_guard.dp.node_policy import enforced_policy, policy_digest
    from flwr_guard.dp.node_status import node_dp_status

    node = {"dp-sgd-ledger": str(ledger_dir)}
    assert enforced_policy({}) == {
        "dp-min-noise-multiplier": 0.5, "dp-honest-contributors": 3,
        "dp-sgd-min-noise-multiplier": 0.5, "dp-sgd-max-epsilon": 10.0,
        "dp-sgd-secure-mode": False, "dp-sgd-data-source": "default"}
    assert policy_digest({}) == policy_digest({"dp-sgd-max-epsilon": 10.0})  # defaults explicit
    assert policy_digest({}) != policy_digest({"dp-sgd-max-epsilon": 8.0})
    before = node_dp_status(node)
    assert before.epsilon == 0.0 and before.max_epsilon == 10.0
    dpsgd = _round(_context(ledger_dir))
    after = node_dp_status(node)
    assert after.epsilon == pytest.approx(dpsgd.epsilon()) and after.delta == 1e-4
    assert f"record-level epsilon {dpsgd.epsilon():.4g} of 10 at delta 0.0001" in after.line()
    missing = node_dp_status({**node, "dp-sgd-data-source": "other"})
    assert missing.epsilon is None and "flwr-guard ledger init" in missing.line()
