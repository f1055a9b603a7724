"""The audit's attacks and verdict on real digits (CPU, seeded, small).

DLG's sigmoid LeNet at 28x28 (upsampled digits), batch size 1, one SGD step with
learning rate 1: unprotected updates leak, clipping alone still leaks (to the
scale-free attack), DP noise z = 0.1 at C = 1 hides the victims.
"""

from __future__ import annotations

import pytest
import torch

from flwr_guard.audit import AuditPlan, LocalTraining, Protections, SigmoidLeNet, run_audit
from flwr_guard.audit.data import client_pool
from flwr_guard.audit.report import AuditReport

POOL = 120
FEDSGD = LocalTraining(local_steps=1, learning_rate=1.0)


@pytest.fixture(scope="module")
def digits28() -> tuple[torch.Tensor, torch.Tensor]:
    return client_pool(image_size=28, size=POOL, seed=0)


@pytest.fixture(scope="module")
def lenet28() -> SigmoidLeNet:
    return SigmoidLeNet(image_size=28, generator=torch.Generator().manual_seed(0))


def _audits(model, data, protections, attacks, effort, victims) -> AuditReport:
    images, labels = data
    plan = AuditPlan(
        batch_size=1, training=FEDSGD, protections=protections, attacks=attacks,
        effort=effort, time_budget_s=None,
    )
    reports = [
        run_audit(model, images, labels, plan, seed=seed, victim_indices=torch.tensor([v]))
        for seed, v in enumerate(victims)
    ]
    return AuditReport.combine(reports)


def test_unprotected_update_leaks_most_victims(digits28, lenet28) -> None:
    report = _audits(lenet28, digits28, Protections(), ("idlg",), 0.5, victims=(3, 40, 77))
    base = report.baselines["mean-image"].mean_psnr_db
    assert report.worst.identified_rate >= 2 / 3
    assert report.worst.mean_psnr_db >= 20.0
    assert report.psnr_gain_db >= 8.0, (report.worst.mean_psnr_db, base)
    assert report.worst.label_accuracy == 1.0  # iDLG's label rule
    assert report.leaks


def test_clipping_alone_still_leaks_to_the_scale_free_attack(digits28, lenet28) -> None:
    report = _audits(
        lenet28, digits28, Protections(clipping_norm=1.0), ("idlg", "idlg-cos"), 0.5,
        victims=(3, 40),
    )
    assert all(n > 1.0 for n in report.update_norms)  # clipping is active
    by_name = {run.name: run.scores for run in report.attacks}
    base = report.baselines["mean-image"].mean_psnr_db
    # The L2 attack matches the clipped (rescaled) update and fails ...
    assert by_name["idlg"].identified_rate == 0.0
    assert by_name["idlg"].mean_psnr_db < base + 3.0
    # ... the cosine one does not care about the scale: the worst case leaks.
    assert by_name["idlg-cos"].identified_rate == 1.0
    assert report.leaks and report.strongest_attack == "idlg-cos"


def test_dp_noise_hides_every_victim(digits28, lenet28) -> None:
    report = _audits(
        lenet28, digits28, Protections(clipping_norm=1.0, noise_multiplier=0.1),
        ("idlg", "idlg-cos", "ig", "ig-prior"), 0.25, victims=(3, 40, 77),
    )
    base = report.baselines["mean-image"].mean_psnr_db
    assert report.worst.identified_rate == 0.0
    assert abs(report.worst.mean_psnr_db - base) <= 2.0, (report.worst.mean_psnr_db, base)
    assert not report.leaks
