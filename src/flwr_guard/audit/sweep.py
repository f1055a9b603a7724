"""The sweep behind ``flwr-guard audit``: every defence × batch size × model × image
size, audited on real digits.

Defences (the observed update is built as in :mod:`flwr_guard.audit.protections`):

| name | protections |
| --- | --- |
| ``none`` | the server sees the client's update |
| ``clip`` | update clipped to C = 1 |
| ``dp-0.001`` … ``dp-1`` | clipped to C = 1, Gaussian noise z·C with z ∈ {0.001, 0.01, 0.1, 1} |
| ``secagg-4``, ``secagg-16`` | the server sees the mean of 4 / 16 clients' updates |

Models: ``digits-cnn`` (the reference app's GroupNorm/ReLU CNN) and ``lenet`` (DLG's
sigmoid LeNet, :class:`~flwr_guard.audit.lenet.SigmoidLeNet`), both at their seeded
initialisation (the first round, where gradients are largest and attacks are known to
work best). The probe is one SGD step with learning rate 1 (FedSGD: the update is the
batch gradient, so ``C = 1`` clips the gradient, as in DP-SGD with batch size 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from flwr_guard.audit.audit import AuditPlan, run_audit
from flwr_guard.audit.data import client_pool
from flwr_guard.audit.lenet import SigmoidLeNet
from flwr_guard.audit.protections import Protections
from flwr_guard.audit.report import AuditReport
from flwr_guard.audit.sampling import derived_seed
from flwr_guard.audit.update import LocalTraining


def _digits_cnn(image_size: int, seed: int) -> nn.Module:
    from flwr_guard.models.digits_cnn import DigitsCNN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN(image_size=image_size)


def _lenet(image_size: int, seed: int) -> nn.Module:
    return SigmoidLeNet(image_size=image_size, generator=torch.Generator().manual_seed(seed))


MODELS: dict[str, Callable[[int, int], nn.Module]] = {"digits-cnn": _digits_cnn, "lenet": _lenet}

DEFENCES: dict[str, Protections] = {
    "none": Protections(),
    "clip": Protections(clipping_norm=1.0),
    "dp-0.001": Protections(clipping_norm=1.0, noise_multiplier=0.001),
    "dp-0.01": Protections(clipping_norm=1.0, noise_multiplier=0.01),
    "dp-0.1": Protections(clipping_norm=1.0, noise_multiplier=0.1),
    "dp-1": Protections(clipping_norm=1.0, noise_multiplier=1.0),
    "secagg-4": Protections(aggregate_size=4),
    "secagg-16": Protections(aggregate_size=16),
}


@dataclass(frozen=True)
class SweepCell:
    """One setting of the sweep."""

    model: str
    image_size: int
    defence: str
    batch_size: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.image_size}px/{self.defence}/B{self.batch_size}"


@dataclass(frozen=True)
class SweepOptions:
    """What ``flwr-guard audit`` sweeps and how hard it attacks.

    Attributes:
        models, image_sizes, defences, batch_sizes: the grid (names from
            :data:`MODELS` and :data:`DEFENCES`).
        audits: audits per cell (different victims; all cells use the same victims).
        effort: attack iteration scale; time_budget_s: per audit.
        attacks: attack names (``None``: the defaults).
        pool_size: digits in the audited client's data.
        seed: seeds data, models, victims, noise and attacks.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: for unknown names or empty grids.
    """

    models: tuple[str, ...] = ("digits-cnn", "lenet")
    image_sizes: tuple[int, ...] = (8, 28)
    defences: tuple[str, ...] = tuple(DEFENCES)
    batch_sizes: tuple[int, ...] = (1, 4)
    audits: int = 2
    effort: float = 0.5
    time_budget_s: float | None = 40.0
    attacks: tuple[str, ...] | None = None
    pool_size: int = 300
    seed: int = 0
    device: str = "auto"
    training: LocalTraining = field(default_factory=lambda: LocalTraining(1, 1.0))

    def __post_init__(self) -> None:
        for kind, names, known in (
            ("model", self.models, MODELS),
            ("defence", self.defences, DEFENCES),
        ):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {kind}(s) {unknown}; known: {sorted(known)}")
        if not (self.models and self.image_sizes and self.defences and self.batch_sizes):
            raise ValueError("every dimension of the sweep needs at least one value")
        if self.audits < 1:
            raise ValueError(f"audits must be >= 1, got {self.audits}")

    def cells(self) -> list[SweepCell]:
        return [
            SweepCell(m, s, d, b)
            for m in self.models
            for s in self.image_sizes
            for b in self.batch_sizes
            for d in self.defences
        ]


def run_cell(cell: SweepCell, options: SweepOptions) -> AuditReport:
    """Audit one cell ``options.audits`` times and pool the victims."""
    images, labels = client_pool(cell.image_size, options.pool_size, options.seed)
    model = MODELS[cell.model](cell.image_size, options.seed)
    plan = AuditPlan(
        batch_size=cell.batch_size,
        training=options.training,
        protections=DEFENCES[cell.defence],
        attacks=options.attacks,
        effort=options.effort,
        time_budget_s=options.time_budget_s,
    )
    reports = []
    for audit in range(options.audits):
        # Victims depend on the audit index and batch size only: every defence and
        # model sees the same victims, so the rows of the grid line up.
        victim_seed = derived_seed(options.seed, audit, cell.batch_size)
        victim_gen = torch.Generator().manual_seed(victim_seed)
        victims = torch.randperm(images.shape[0], generator=victim_gen)[: cell.batch_size]
        reports.append(run_audit(
            model, images, labels, plan,
            seed=derived_seed(options.seed, cell.key, audit),
            device=options.device, victim_indices=victims,
        ))
    report = AuditReport.combine(reports)
    report.setting.update(
        model=cell.model, image_size=cell.image_size, defence=cell.defence, audits=options.audits
    )
    return report


def run_sweep(
    options: SweepOptions,
    on_cell: Callable[[SweepCell, AuditReport], None] = lambda c, r: None,
) -> list[tuple[SweepCell, AuditReport]]:
    """Run every cell in order; ``on_cell`` is called after each (progress)."""
    results = []
    for cell in options.cells():
        report = run_cell(cell, options)
        on_cell(cell, report)
        results.append((cell, report))
    return results
