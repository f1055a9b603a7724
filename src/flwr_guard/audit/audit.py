"""One leakage audit: build the update the server would see from a batch of the
client's own data, attack it, score the reconstructions against that batch.

The probe follows the client's training (:class:`~flwr_guard.audit.update.LocalTraining`)
and the protections in force (:class:`~flwr_guard.audit.protections.Protections`): the
victim batch of ``B`` samples is one client's update; for an aggregate of ``n``
clients, ``n − 1`` other batches drawn from the rest of the client's data stand in for
the other clients. Attacks see only the server's view (global weights, observed
update, training schedule, the population mean image); scores use the real batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from flwr_guard.audit.attack import AttackTarget
from flwr_guard.audit.baselines import baseline_scores, mean_image
from flwr_guard.audit.labels import last_linear_names
from flwr_guard.audit.protections import Protections, observed_update
from flwr_guard.audit.report import AttackRun, AuditReport, ScoreSet, worst_case
from flwr_guard.audit.scores import score
from flwr_guard.audit.suite import attacks_for, build_attacks
from flwr_guard.audit.update import (
    LocalTraining,
    gradient_equivalent_update,
    trainable_params,
    update_norm,
)
from flwr_guard.audit.verdict import VerdictRule
from flwr_guard.device import resolve_device


@dataclass(frozen=True)
class AuditPlan:
    """What one audit does.

    Attributes:
        batch_size: samples ``B`` in the audited update (>= 1).
        training: the clients' local steps and learning rate (the update is
            ``θ_T − θ₀``; clipping and noise act in those units).
        protections: clipping norm, noise multiplier, aggregate size.
        attacks: attack names (:data:`flwr_guard.audit.suite.ATTACKS`); ``None`` for
            the defaults.
        effort: scales every attack's iteration count.
        time_budget_s: wall-clock budget of all attacks together (``None``: no limit);
            the budget is shared out evenly, time an attack leaves passes on.
        rule: the leak verdict.
        cpu_threads: torch intra-op threads while auditing on CPU (``None``: leave as
            is). One thread is fastest for these small models on a shared machine;
            on CPU the audit also turns oneDNN (mkldnn) convolutions off, which are
            about 2x slower than PyTorch's own kernels on 8x8–28x28 inputs.

    Raises:
        ValueError: for ``batch_size < 1`` or a non-positive budget; unknown attacks.
    """

    batch_size: int = 1
    training: LocalTraining = field(default_factory=LocalTraining)
    protections: Protections = field(default_factory=Protections)
    attacks: tuple[str, ...] | None = None
    effort: float = 1.0
    time_budget_s: float | None = 60.0
    rule: VerdictRule = field(default_factory=VerdictRule)
    cpu_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        attacks_for(self.training.local_steps, self.attacks)  # validates the names

    @property
    def attack_names(self) -> list[str]:
        return attacks_for(self.training.local_steps, self.attacks)

    def describe(self) -> dict[str, object]:
        return {
            "protections": self.protections.label,
            "clipping-norm": self.protections.clipping_norm,
            "noise-multiplier": self.protections.noise_multiplier,
            "aggregate-size": self.protections.aggregate_size,
            "batch-size": self.batch_size,
            "local-steps": self.training.local_steps,
            "learning-rate": self.training.learning_rate,
            "attacks": self.attack_names,
        }


@contextlib.contextmanager
def _cpu_settings(device: torch.device, threads: int | None) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads(), torch.backends.mkldnn.enabled
    if threads is not None:
        torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.backends.mkldnn.enabled = previous[1]


def _num_classes(model: nn.Module) -> int:
    weight_name, _ = last_linear_names(model)
    return int(dict(model.named_parameters())[weight_name].shape[0])


def run_audit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: AuditPlan,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    victim_indices: torch.Tensor | None = None,
) -> AuditReport:
    """Audit one update built from ``plan.batch_size`` samples of a client's data.

    Args:
        model: the global model as the client received it (its weights are ``θ₀``;
            the model is not modified). Must end in an ``nn.Linear`` classifier.
        images: float ``(M, C, H, W)`` in ``[0, 1]``, the client's data.
        labels: int ``(M,)`` class ids.
        plan: batch size, training, protections, attacks, budget, verdict rule.
        seed: seeds the choice of victims, stand-ins, noise and attack initialisation.
        device: where attacks run (``"auto"``: CUDA when available).
        victim_indices: ``(B,)`` positions in ``images`` to audit (default: drawn).

    Returns:
        An :class:`~flwr_guard.audit.report.AuditReport` (scores, verdict, and the
        best reconstruction of each victim, in memory only).

    Raises:
        ValueError: for mismatched shapes, values outside ``[0, 1]``, a client with
            fewer than ``B + 1`` samples, bad victim indices, or an unavailable device.
    """
    started = time.monotonic()
    dev = resolve_device(device, fallback=False)
    images, labels = _check_data(images, labels, plan.batch_size)
    generator = torch.Generator().manual_seed(seed)
    num = images.shape[0]
    if victim_indices is None:
        victim_indices = torch.randperm(num, generator=generator)[: plan.batch_size]
    victim_indices = torch.as_tensor(victim_indices, dtype=torch.long).reshape(-1)
    distinct = victim_indices.unique().numel()
    if victim_indices.numel() != plan.batch_size or distinct != plan.batch_size:
        raise ValueError(
            f"need {plan.batch_size} distinct victim indices, got {victim_indices.tolist()}"
        )
    if victim_indices.min() < 0 or victim_indices.max() >= num:
        raise ValueError(f"victim indices out of range [0, {num})")
    others = _stand_ins(num, victim_indices, plan, generator)

    with _cpu_settings(dev, plan.cpu_threads):
        model = model.to(dev)
        params = {k: v.to(dev) for k, v in trainable_params(model).items()}
        scale = plan.training.learning_rate * plan.training.local_steps
        batches = [victim_indices, *others]
        deltas, norms = [], []
        for batch in batches:
            u = gradient_equivalent_update(
                model, params, images[batch].to(dev), labels[batch].to(dev), plan.training
            )
            delta = [-scale * t for t in u]
            deltas.append(delta)
            norms.append(float(update_norm(delta)))
        observed = observed_update(deltas, plan.protections, generator)
        prior = mean_image(images)
        target = AttackTarget(
            model=model,
            params=params,
            observed=[-t / scale for t in observed],
            training=plan.training,
            num_images=plan.batch_size * plan.protections.aggregate_size,
            image_shape=tuple(images.shape[1:]),
            num_classes=_num_classes(model),
            prior_mean=prior.to(dev),
        )
        victims, victim_labels = images[victim_indices], labels[victim_indices]
        runs, best_images = _attack_all(
            target, plan, generator, victims, victim_labels, victim_indices, images, prior
        )

    baselines = {
        k: ScoreSet(v.psnr_db.tolist(), v.ssim.tolist())
        for k, v in baseline_scores(victims, images).items()
    }
    return AuditReport(
        setting=plan.describe(),
        attacks=runs,
        worst=worst_case(runs),
        baselines=baselines,
        chance_identification=1.0 / num,
        update_norms=norms[:1],
        seconds=time.monotonic() - started,
        rule=plan.rule,
        originals=victims.clone(),
        reconstructions=best_images,
    )


def _check_data(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images, dtype=torch.float32).cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if images.dim() != 4:
        raise ValueError(f"images must be (M, C, H, W), got shape {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.shape[0] < batch_size + 1:
        raise ValueError(
            f"the client has {images.shape[0]} samples; an audit of batch size {batch_size} "
            f"needs at least {batch_size + 1}"
        )
    if images.min() < 0.0 or images.max() > 1.0:
        raise ValueError("pixel values must lie in [0, 1]")
    return images, labels


def _stand_ins(
    num: int, victims: torch.Tensor, plan: AuditPlan, generator: torch.Generator
) -> list[torch.Tensor]:
    """Batches of the other ``n − 1`` clients of an aggregate, drawn from the client's
    other samples (without replacement while they last)."""
    needed = plan.batch_size * (plan.protections.aggregate_size - 1)
    if needed == 0:
        return []
    mask = torch.ones(num, dtype=torch.bool)
    mask[victims] = False
    rest = torch.nonzero(mask).flatten()
    picks = rest[torch.randperm(rest.numel(), generator=generator)]
    if picks.numel() < needed:
        extra = rest[torch.randint(rest.numel(), (needed - picks.numel(),), generator=generator)]
        picks = torch.cat([picks, extra])
    return list(picks[:needed].split(plan.batch_size))


def _attack_all(
    target: AttackTarget,
    plan: AuditPlan,
    generator: torch.Generator,
    victims: torch.Tensor,
    victim_labels: torch.Tensor,
    victim_indices: torch.Tensor,
    pool: torch.Tensor,
    prior: torch.Tensor,
) -> tuple[list[AttackRun], torch.Tensor]:
    attacks = build_attacks(plan.attack_names, plan.effort)
    start = time.monotonic()
    runs: list[AttackRun] = []
    best_psnr = torch.full((victims.shape[0],), -float("inf"))
    best_images = victims.new_zeros(victims.shape)
    for i, attack in enumerate(attacks):
        deadline = None
        if plan.time_budget_s is not None:
            remaining = plan.time_budget_s - (time.monotonic() - start)
            deadline = time.monotonic() + max(remaining, 0.0) / (len(attacks) - i)
        rec = attack.reconstruct(target, generator, deadline)
        scored = score(rec.images, rec.labels, victims, victim_labels, victim_indices, pool, prior)
        better = scored.psnr_db > best_psnr
        best_psnr = torch.where(better, scored.psnr_db, best_psnr)
        best_images[better] = scored.images[better]
        runs.append(
            AttackRun(
                name=rec.attack,
                scores=ScoreSet(
                    scored.psnr_db.tolist(),
                    scored.ssim.tolist(),
                    scored.identified.tolist(),
                    scored.label_correct.tolist(),
                ),
                seconds=rec.seconds,
                iterations=rec.iterations,
                stopped_by_budget=rec.stopped_by_budget,
                loss=rec.loss,
            )
        )
    return runs, best_images
