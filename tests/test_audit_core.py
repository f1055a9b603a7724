"""Core pieces of the audit: update model, protections, labels, scores, sampling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flwr_guard.audit import AuditPlan, LocalTraining, Protections, SigmoidLeNet, run_audit
from flwr_guard.audit.baselines import baseline_scores, mean_image
from flwr_guard.audit.data import client_pool
from flwr_guard.audit.labels import class_signal, infer_labels
from flwr_guard.audit.protections import clip_update, observed_update
from flwr_guard.audit.sampling import AuditSampling
from flwr_guard.audit.scores import MAX_PSNR_DB, psnr_db, score, ssim, ssim_window
from flwr_guard.audit.update import gradient_equivalent_update, trainable_params, update_norm
from flwr_guard.audit.verdict import VerdictRule


@pytest.fixture(scope="module")
def digits8() -> tuple[torch.Tensor, torch.Tensor]:
    return client_pool(image_size=8, size=100, seed=1)


def _lenet8() -> SigmoidLeNet:
    return SigmoidLeNet(image_size=8, generator=torch.Generator().manual_seed(0))


def test_simulated_update_equals_real_local_sgd(digits8) -> None:
    images, labels = digits8[0][:5], digits8[1][:5]
    model = _lenet8()
    training = LocalTraining(local_steps=3, learning_rate=0.2)
    start = trainable_params(model)
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.2)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(trained(images), labels).backward()
        optimizer.step()
    expected = [(start[n] - p.detach()) / (0.2 * 3) for n, p in trained.named_parameters()]
    simulated = gradient_equivalent_update(model, start, images, labels, training)
    for got, want in zip(simulated, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_clipping_noise_and_aggregation_are_exact() -> None:
    update = [torch.full((3,), 4.0), torch.full((4,), 4.0)]  # norm 4 * sqrt(7)
    clipped = clip_update(update, 2.0)
    assert math.isclose(float(update_norm(clipped)), 2.0, rel_tol=1e-6)
    small = [torch.tensor([0.3, 0.4])]
    torch.testing.assert_close(clip_update(small, 2.0)[0], small[0])  # below C: unchanged
    # The server's view of an aggregate is the mean of the clipped updates.
    a, b = [torch.tensor([3.0, 4.0])], [torch.tensor([0.0, 1.0])]
    mean = observed_update([a, b], Protections(clipping_norm=1.0, aggregate_size=2))
    torch.testing.assert_close(mean[0], torch.tensor([0.3, 0.9]))
    # Noise of std z*C on the sum, i.e. z*C/n on the mean.
    zeros = [[torch.zeros(200_000)] for _ in range(4)]
    noisy = observed_update(
        zeros, Protections(1.0, 0.5, 4), torch.Generator().manual_seed(0)
    )[0]
    assert abs(float(noisy.std()) - 0.5 / 4) < 0.002


def test_one_dpsgd_step_is_a_clipped_noisy_update() -> None:
    torch.manual_seed(0)
    grad = [torch.randn(50) * 3]
    lr, c, sigma = 0.1, 1.0, 0.7
    view = Protections.from_dpsgd(c, sigma, lr)
    delta = [-lr * g for g in grad]
    noise_free = observed_update([delta], Protections(view.clipping_norm))
    expected = -lr * grad[0] * min(1.0, c / float(grad[0].norm()))  # Opacus' step on B = 1
    torch.testing.assert_close(noise_free[0], expected)
    assert view.noise_multiplier * view.clipping_norm == pytest.approx(lr * sigma * c)


def test_protections_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="clipping_norm"):
        Protections(noise_multiplier=0.1)
    with pytest.raises(ValueError):
        Protections(clipping_norm=0.0)
    with pytest.raises(ValueError):
        Protections(aggregate_size=0)
    with pytest.raises(ValueError, match="expected 2 updates"):
        observed_update([[torch.zeros(1)]], Protections(aggregate_size=2))


def test_labels_come_out_of_the_last_layer(digits8) -> None:
    images, labels = digits8
    model = _lenet8()
    params = trainable_params(model)
    names = list(params)
    training = LocalTraining(1, 1.0)
    hits = 0
    for i in range(20):
        u = gradient_equivalent_update(model, params, images[i : i + 1], labels[i : i + 1], training)
        hits += int(infer_labels(class_signal(model, names, u), 1)) == int(labels[i])
    assert hits == 20  # iDLG's rule is exact for one sample
    batch = torch.tensor([0, 1, 2, 5])  # four different classes
    u = gradient_equivalent_update(model, params, images[batch], labels[batch], training)
    clipped = clip_update(u, 0.01)  # ratios survive clipping
    inferred = infer_labels(class_signal(model, names, clipped), 4)
    assert sorted(inferred.tolist()) == sorted(labels[batch].tolist())


def test_scores_against_reference_values() -> None:
    target = torch.zeros(1, 1, 8, 8)
    assert float(psnr_db(target + 0.1, target)) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert float(psnr_db(target, target)) == MAX_PSNR_DB
    assert ssim_window(8, 8) == (7, pytest.approx(1.5 * 7 / 11))
    assert ssim_window(28, 28) == (11, 1.5)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError):
        ssim_window(2, 2)


def test_identification_needs_the_victim_and_must_beat_the_mean(digits8) -> None:
    images, labels = digits8
    prior = mean_image(images)
    victims = images[[7, 9]]
    # A slightly noisy copy of each victim is identified; the mean image is not.
    noisy = (victims + 0.05 * torch.randn(victims.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    scored = score(noisy.flip(0), labels[[9, 7]], victims, labels[[7, 9]], torch.tensor([7, 9]), images, prior)
    assert scored.identified.tolist() == [True, True]  # paired despite the order (26 dB)
    assert scored.label_correct.tolist() == [True, True]
    guess = prior.expand(2, *prior.shape)
    scored = score(guess, labels[[7, 9]], victims, labels[[7, 9]], torch.tensor([7, 9]), images, prior)
    assert not scored.identified.any()
    base = baseline_scores(victims, images)
    torch.testing.assert_close(base["mean-image"].psnr_db, scored.psnr_db)
    assert (base["flat-mean"].psnr_db < base["mean-image"].psnr_db).all()


def test_verdict_rule() -> None:
    rule = VerdictRule(psnr_margin_db=3.0)
    assert rule.judge(0.5, -1.0)[0]
    assert rule.judge(0.0, 3.5)[0]
    assert not rule.judge(0.0, 2.9)[0]
    with pytest.raises(ValueError):
        VerdictRule(psnr_margin_db=-1)


def test_sampling_is_reproducible_and_close_to_its_fractions() -> None:
    sampling = AuditSampling(round_fraction=0.2, client_fraction=0.5, seed=3)
    draws = [sampling.sampled(r, n) for r in range(400) for n in range(10)]
    assert draws == [sampling.sampled(r, n) for r in range(400) for n in range(10)]
    rounds = sum(sampling.round_sampled(r) for r in range(400)) / 400
    assert 0.14 < rounds < 0.26
    assert 0.07 < sum(draws) / len(draws) < 0.13
    assert not any(AuditSampling(0.0, 1.0).sampled(r, 1) for r in range(50))
    with pytest.raises(ValueError):
        AuditSampling(round_fraction=1.5)


def test_run_audit_rejects_bad_data(digits8) -> None:
    images, labels = digits8
    model = _lenet8()
    plan = AuditPlan(attacks=("idlg",), effort=0.01, time_budget_s=None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_audit(model, images * 2, labels, plan)
    with pytest.raises(ValueError, match="labels"):
        run_audit(model, images, labels[:-1], plan)
    with pytest.raises(ValueError, match="at least 2"):
        run_audit(model, images[:1], labels[:1], plan)
    with pytest.raises(ValueError, match="unknown attack"):
        AuditPlan(attacks=("nope",))


def test_an_update_after_several_local_steps_leaks_to_an_attacker_who_simulates_them(digits8) -> None:
    images, labels = digits8
    plan = AuditPlan(
        training=LocalTraining(local_steps=5, learning_rate=0.1), attacks=("idlg",),
        effort=0.3, time_budget_s=None,
    )
    report = run_audit(_lenet8(), images, labels, plan, seed=0)
    assert report.setting["local-steps"] == 5
    assert report.worst.identified_rate == 1.0 and report.psnr_gain_db > 10
