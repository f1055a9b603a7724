"""Trap-model check: a malicious server plants an imprint layer (Fowl et al. 2022) in
the global model and sends it through the real Flower path (GuardedStrategy, SecAgg+
over 4 clients, the clients' real mods, Flower's serde). Without the check individual
records come out of the masked sum; with it every client refuses, with its reason on
the server. Honest models (digits CNN and MLP, a tabular MLP) are not flagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from guard_harness import LoopbackGrid
from sklearn.datasets import load_digits, load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

from flwr_guard.audit.analytic import recover
from flwr_guard.audit.audit_mod import LeakageAuditConfig
from flwr_guard.audit.imprint import plant_imprint
from flwr_guard.audit.inputs import prepare
from flwr_guard.audit.sampling import AuditSampling
from flwr_guard.audit.scores import psnr_db
from flwr_guard.audit.trap_check import check_model, structural_findings
from flwr_guard.audit.update import trainable_params
from flwr_guard.guard import ClientPolicy, GuardMismatch
from flwr_guard.guard.client import ClientGuard, LeakageAudit
from flwr_guard.guard.strategy import GuardedStrategy, SecAgg
from flwr_guard.models.digits_cnn import DigitsCNN

NODES = (11, 12, 13, 14)
BATCH, LR = 32, 1.0
_digits = load_digits()
IMAGES = torch.tensor(_digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
LABELS = torch.tensor(_digits.target)
PUBLIC = IMAGES[1400:].reshape(-1, 64)  # the server's public data: no client record


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _honest_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _mlp().state_dict()


def _client_data(context) -> dict[str, torch.Tensor]:  # dict batches, as the new user's
    node = getattr(context, "node_id", context)
    start = (node - NODES[0]) * 300
    return {"x": IMAGES[start:start + 300], "y": LABELS[start:start + 300]}


def _train(msg: Message, context) -> Message:
    """FedSGD: one step on the client's first batch."""
    model = _mlp()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = _client_data(context)
    loss = nn.functional.cross_entropy(model(data["x"][:BATCH]), data["y"][:BATCH])
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord({"num-examples": BATCH})}), reply_to=msg)


def _app(guard: ClientGuard, trained: list[int]) -> ClientApp:
    app = ClientApp()

    def train(msg, context):
        trained.append(context.node_id)
        return _train(msg, context)

    app.train(mods=guard.train_mods())(train)
    return app


def _run(state: dict[str, torch.Tensor], audit: LeakageAudit | None):
    guard = ClientGuard(ClientPolicy(secagg=True), audit=audit)
    trained: list[int] = []
    grid = LoopbackGrid({n: _app(guard, trained) for n in NODES})
    strategy = GuardedStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4),
        secagg=SecAgg(timeout=10, quantization_range=2**20, options={"max_weight": 64}))
    return strategy, grid, trained, ArrayRecord(state)


def _audit() -> LeakageAudit:
    return LeakageAudit(_mlp, _client_data,
                        config=LeakageAuditConfig(sampling=AuditSampling(0.0, 0.0)))


def _records_recovered(initial: dict[str, torch.Tensor], aggregate: ArrayRecord) -> torch.Tensor:
    """The server's attack on the masked sum: PSNR of each client record's best match."""
    model = _mlp()
    model.load_state_dict(initial)
    params = trainable_params(model)
    after = aggregate.to_torch_state_dict()
    gradient = [(initial[name] - after[name]) / LR for name in params]
    candidates = recover(model, params, gradient, (1, 8, 8)).clamp(0, 1)
    records = torch.cat([_client_data(n)["x"][:BATCH] for n in NODES])
    return torch.stack([psnr_db(candidates, r.expand_as(candidates)).max() for r in records])


def test_an_imprint_model_leaks_records_through_secagg_without_the_check() -> None:
    trap = plant_imprint(_honest_state(), "1", "3", PUBLIC)
    strategy, grid, trained, initial = _run(trap, audit=None)
    result = strategy.start(grid, initial, num_rounds=1)
    assert sorted(trained) == list(NODES)
    assert strategy.secagg.history[-1].survivors == 4  # the server saw only the masked sum
    psnr = _records_recovered(trap, result.arrays)
    exact = int((psnr >= 40).sum())
    assert exact >= 10, f"only {exact} of {psnr.numel()} records recovered (PSNR {psnr.max():.1f})"


def test_with_the_check_every_client_refuses_the_imprint_model_before_training() -> None:
    trap = plant_imprint(_honest_state(), "1", "3", PUBLIC)
    strategy, grid, trained, initial = _run(trap, audit=_audit())
    with pytest.raises(GuardMismatch) as raised:
        strategy.start(grid, initial, num_rounds=1)
    message = str(raised.value)
    assert "4 of 4 clients refused" in message
    assert "received model refused: trap model" in message
    assert "share one direction (an imprint/binning layer)" in message
    assert trained == []  # nothing was trained, nothing sent


def test_with_the_check_the_honest_model_trains_normally() -> None:
    honest = _honest_state()
    strategy, grid, trained, initial = _run(honest, audit=_audit())
    strategy.start(grid, initial, num_rounds=1)
    assert sorted(trained) == list(NODES)
    assert strategy.aggregated_rounds == 1


def test_malformed_models_are_refused_before_training() -> None:
    nan = {k: v.clone() for k, v in _honest_state().items()}
    nan["1.weight"][0, 0] = float("nan")
    strategy, grid, trained, initial = _run(nan, audit=_audit())
    with pytest.raises(GuardMismatch, match=r"NaN or infinite weights in \['1.weight'\]"):
        strategy.start(grid, initial, num_rounds=1)
    wrong = {k: v.clone() for k, v in _honest_state().items()}
    wrong["1.weight"] = torch.zeros(64, 63)
    strategy, grid, trained, initial = _run(wrong, audit=_audit())
    with pytest.raises(GuardMismatch, match="the weights do not fit Sequential.*size mismatch"):
        strategy.start(grid, initial, num_rounds=1)
    assert trained == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_honest_models_are_not_flagged(seed: int) -> None:
    torch.manual_seed(seed)
    digits = prepare(IMAGES[:300], LABELS[:300])
    assert not check_model(DigitsCNN(), digits, seed=seed).trapped
    mlp = _mlp()
    assert not check_model(mlp, digits, seed=seed).trapped
    x, y = load_wine(return_X_y=True)
    wine = prepare(torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float32)[:60],
                   torch.tensor(y)[:60])
    tabular = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))
    finding = check_model(tabular, wine, seed=seed)
    assert not finding.trapped, finding.reason
    assert np.isfinite(finding.seconds)


def test_a_leakage_audit_that_cannot_be_built_fails_when_the_guard_is_built() -> None:
    with pytest.raises(TypeError, match="model_fn must build the model .* got a Sequential instance"):
        LeakageAudit(_mlp(), _client_data)
    with pytest.raises(TypeError, match="LeakageAudit.data_fn must be callable, got dict"):
        LeakageAudit(_mlp, {"x": IMAGES, "y": LABELS})
    assert LeakageAudit(DigitsCNN, _client_data).model_fn is DigitsCNN  # a class builds models
    with pytest.raises(TypeError, match="trap_check must be True, False or a TrapCheckConfig"):
        LeakageAudit(_mlp, _client_data, trap_check="yes")


def test_a_node_can_spot_an_imprint_layer_on_the_arrays_alone() -> None:
    honest = {k: v.numpy() for k, v in _honest_state().items()}
    assert structural_findings(honest) == []
    trap = {k: v.numpy() for k, v in plant_imprint(_honest_state(), "1", "3", PUBLIC).items()}
    found = structural_findings(trap)
    assert "64 rows of '1.weight' (64, 64) share one direction (an imprint/binning layer)" in found
    torch.manual_seed(0)
    trained = {k: v.detach().numpy() for k, v in DigitsCNN().state_dict().items()}
    assert structural_findings(trained) == []
    honest["3.bias"][0] = np.inf
    assert structural_findings(honest) == ["NaN or infinite values in '3.bias'"]
