"""The audit on any input: tabular rows (wine, 13 features), a linear model, token
sequences, dict batches, tiny images; unsupported inputs are named."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler
from torch import nn

from flwr_guard.audit import AuditPlan, Protections, run_audit
from flwr_guard.audit.inputs import UnsupportedAuditInput, as_pair, prepare
from flwr_guard.audit.scores import ssim
from flwr_guard.audit.vector_scores import cosine, recovered_fraction, relative_l2_error


@pytest.fixture(scope="module")
def wine() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_wine(return_X_y=True)
    return torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float32), torch.tensor(y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))


def _plan(batch: int = 1, n: int = 1, **kw) -> AuditPlan:
    return AuditPlan(batch_size=batch, protections=Protections(aggregate_size=n), effort=0.2,
                     time_budget_s=None, **kw)


def test_tabular_mlp_single_record_is_recovered_exactly(wine) -> None:
    x, y = wine
    report = run_audit(_mlp(), x, y, _plan(), seed=1)
    assert report.setting["modality"] == "vector"
    assert "analytic" in report.setting["attacks"]  # the first Linear sees the input
    analytic = {r.name: r.scores for r in report.attacks}["analytic"]
    assert analytic.rel_l2[0] < 1e-4 and analytic.recovered[0] == 1.0
    assert report.leaks and report.verdict[1] == "100% of victims identified"
    assert math.isnan(report.worst.ssim[0])  # SSIM does not apply to a 13-vector
    metrics = report.to_metrics()
    assert metrics["audit-rel-l2-error"] < 1e-4 and metrics["audit-cosine"] > 0.9999
    assert metrics["audit-recovered-fraction"] == 1.0 and math.isnan(metrics["audit-ssim"])


def test_sklearn_style_linear_model_is_audited(wine) -> None:
    x, y = wine
    torch.manual_seed(0)
    linear = nn.Linear(13, 3)  # logistic regression
    report = run_audit(linear, x, y, _plan(), seed=2)
    assert report.leaks and report.worst.rel_l2[0] < 1e-4  # Phong: W_i / b_i
    aggregated = run_audit(linear, x, y, _plan(batch=4, n=4), seed=2)
    # 16 records mixed in 3 rows: no exact recovery any more (a victim may still be
    # nearest to a class mixture on 178 rows, which the verdict may count).
    assert min(aggregated.worst.rel_l2) > 0.1


def test_token_set_leaks_from_the_embedding_gradient() -> None:
    vocab, length = 60, 6
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (80, length), generator=g)
    labels = (tokens[:, 0] % 2).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, 8), nn.Flatten(), nn.Linear(8 * length, 2))
    report = run_audit(model, tokens, labels, _plan(), seed=3)
    assert report.setting["modality"] == "tokens"
    assert report.worst.token_f1 == [1.0]  # exactly the victim's distinct tokens
    assert report.leaks and "token F1 1.00" in report.verdict[1]
    assert report.baselines["frequent-tokens"].mean_token_f1 < 0.5
    plan = AuditPlan(protections=Protections(clipping_norm=0.1, noise_multiplier=5.0),
                     time_budget_s=None)
    noisy = run_audit(model, tokens, labels, plan, seed=3)
    assert not noisy.leaks  # rows drown in noise: nothing above the 4-sigma threshold
    assert noisy.worst.token_f1 == [0.0]


def test_dict_batches_and_loaders_are_accepted(wine) -> None:
    x, y = wine
    assert as_pair({"x": x, "y": y})[0].shape == (178, 13)
    loader = torch.utils.data.DataLoader(
        [{"features": a, "label": b} for a, b in zip(x, y)], batch_size=50)
    inputs, labels = as_pair(loader, max_samples=120)
    assert inputs.shape == (120, 13) and labels.shape == (120,)
    with pytest.raises(UnsupportedAuditInput, match=r"keys \['a', 'b'\]"):
        as_pair({"a": x, "b": y})
    with pytest.raises(UnsupportedAuditInput, match="got str"):
        as_pair("data.csv")


def test_unsupported_inputs_are_named_with_type_and_shape(wine) -> None:
    x, y = wine
    with pytest.raises(UnsupportedAuditInput, match=r"Tensor\(torch.float32, \(2, 13\)\)"):
        run_audit(nn.Sequential(nn.Linear(12, 3)), x, y, _plan())
    with pytest.raises(UnsupportedAuditInput, match="NaN"):
        prepare(x.clone().fill_(math.nan), y)
    with pytest.raises(UnsupportedAuditInput, match="need a model with an nn.Embedding"):
        run_audit(_mlp(), torch.zeros((10, 13), dtype=torch.long), y[:10], _plan())


def test_ssim_is_skipped_below_3x3_and_kept_above() -> None:
    tiny = torch.rand(4, 1, 1, 13)
    assert torch.isnan(ssim(tiny, tiny)).all()
    img = torch.rand(4, 1, 8, 8)
    assert torch.allclose(ssim(img, img), torch.ones(4))


def test_vector_scores() -> None:
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert relative_l2_error(b, a).tolist() == pytest.approx([0.0, math.sqrt(2)])
    assert cosine(b, a).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert recovered_fraction(torch.tensor([[0.5, 0.9]]), torch.tensor([[0.52, 0.5]])).item() == 0.5


def test_a_one_row_image_is_audited_with_psnr_and_no_ssim(wine) -> None:
    x, y = wine
    rows = ((x - x.min(0).values) / (x.max(0).values - x.min(0).values)).reshape(-1, 1, 1, 13)
    model = nn.Sequential(nn.Flatten(), nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))
    report = run_audit(model, rows, y, _plan(attacks=("idlg", "ig")), seed=0)
    assert report.setting["modality"] == "image"
    assert all(math.isfinite(r.scores.mean_psnr_db) for r in report.attacks)  # TV of a row: 0
    assert math.isnan(report.worst.mean_ssim) and report.leaks


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_a_tabular_app_is_audited_every_sampled_round_through_the_guard(wine, kind) -> None:
    """The new user's app: a PyTorch MLP (or a logistic regression) on 13 features with
    dict batches, ClientGuard(audit=...) over SecAgg+ with 4 clients, every round sampled."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg
    from guard_harness import LoopbackGrid

    from flwr_guard.audit import AuditSampling, LeakageAuditConfig, LocalTraining
    from flwr_guard.guard import ClientPolicy
    from flwr_guard.guard.client import ClientGuard, LeakageAudit
    from flwr_guard.guard.strategy import GuardedStrategy, SecAgg

    x, y = wine

    def build() -> nn.Module:
        return _mlp() if kind == "mlp" else nn.Sequential(nn.Linear(13, 3))

    def data(context) -> dict[str, torch.Tensor]:
        part = slice((context.node_id - 11) * 44, (context.node_id - 10) * 44)
        return {"x": x[part], "y": y[part]}

    def train(msg, context):
        model = build()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        batch = data(context)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch["x"]), batch["y"]).backward()
        opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": 44})}), reply_to=msg)

    config = LeakageAuditConfig(
        plan=AuditPlan(training=LocalTraining(1, 0.1), protections=Protections(aggregate_size=4),
                       attacks=("idlg", "ig-tv0"), effort=0.05, time_budget_s=1.0),
        sampling=AuditSampling(1.0, 1.0), device="cpu")
    guard = ClientGuard(ClientPolicy(secagg=True), audit=LeakageAudit(build, data, config=config))
    apps = {}
    for node in (11, 12, 13, 14):
        apps[node] = ClientApp()
        apps[node].train(mods=guard.train_mods())(train)
    torch.manual_seed(0)
    strategy = GuardedStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=4,
                                      min_available_nodes=4), secagg=SecAgg(timeout=30))
    strategy.start(LoopbackGrid(apps), ArrayRecord(build().state_dict()), num_rounds=2)
    for rnd in (1, 2):
        summary = strategy.audit.rounds[rnd]
        assert summary["audit-ran"] == 4 and summary["audit-error"] == 0
        assert 0.0 <= summary["audit-rel-l2-error"] < 5.0  # a number, not a neutral 0
        assert -1.0 <= summary["audit-cosine"] <= 1.0
        assert 0.0 <= summary["audit-recovered-fraction"] <= 1.0
        assert math.isnan(summary["audit-ssim"])  # not applicable to a 13-vector
        assert summary["audit-psnr-db"] > summary["audit-baseline-psnr-db"] - 10
