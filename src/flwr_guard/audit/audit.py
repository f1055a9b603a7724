"""One leakage audit: build the update the server would see from a batch of the
client's own data, attack it, score the reconstructions against that batch.

Any input (:mod:`flwr_guard.audit.inputs`): images (PSNR, SSIM where it applies),
vectors such as tabular rows or embeddings (PSNR on ``[0, 1]``-scaled features,
relative L2 error, cosine similarity, fraction of features recovered,
:mod:`flwr_guard.audit.vector_scores`), token sequences (the embedding-gradient
token-set attack and its F1, :mod:`flwr_guard.audit.token_attack`). Continuous inputs
face the optimisation attacks (DLG, iDLG, Inverting Gradients) and, when a linear
layer sees the input, the closed-form ones (:mod:`flwr_guard.audit.analytic`).

The probe follows the client's training (:class:`~flwr_guard.audit.update.LocalTraining`)
and the protections in force (:class:`~flwr_guard.audit.protections.Protections`): the
victim batch of ``B`` samples is one client's update; for an aggregate of ``n``
clients, ``n − 1`` other batches drawn from the rest of the client's data stand in for
the other clients. Attacks see only the server's view (global weights, observed
update, training schedule, the population mean image); scores use the real batch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from flwr_guard.audit.analytic import input_layers
from flwr_guard.audit.attack import AttackTarget
from flwr_guard.audit.baselines import baseline_scores, mean_image
from flwr_guard.audit.inputs import AuditData, UnsupportedAuditInput, describe, prepare
from flwr_guard.audit.labels import last_linear_names
from flwr_guard.audit.protections import Protections, observed_update
from flwr_guard.audit.report import AttackRun, AuditReport, ScoreSet, worst_case
from flwr_guard.audit.scores import score
from flwr_guard.audit.suite import attacks_for, build_attacks
from flwr_guard.audit.token_attack import (
    embedding_names,
    frequent_tokens_f1,
    recovered_tokens,
    token_f1,
)
from flwr_guard.audit.update import (
    LocalTraining,
    gradient_equivalent_update,
    trainable_params,
    update_norm,
)
from flwr_guard.audit.vector_scores import cosine, recovered_fraction, relative_l2_error
from flwr_guard.audit.verdict import VerdictRule
from flwr_guard.device import cpu_settings, resolve_device


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
        analytic: also run the closed-form attacks (:mod:`~flwr_guard.audit.analytic`)
            when a linear layer of the model sees the input (milliseconds).
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
    analytic: bool = True

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


def _num_classes(model: nn.Module) -> int:
    weight_name, _ = last_linear_names(model)
    return int(dict(model.named_parameters())[weight_name].shape[0])


def run_audit(
    model: nn.Module,
    images: object,
    labels: object,
    plan: AuditPlan,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    victim_indices: torch.Tensor | None = None,
    modality: str = "auto",
) -> AuditReport:
    """Audit one update built from ``plan.batch_size`` samples of a client's data.

    Args:
        model: the global model as the client received it (its weights are ``θ₀``;
            the model is not modified). Must end in an ``nn.Linear`` classifier
            (cross-entropy over its outputs).
        images: the client's inputs: float images ``(M, C, H, W)`` in ``[0, 1]``,
            float vectors ``(M, D)`` / ``(M, *S)`` of any range, or integer token ids
            ``(M, L)`` (see :mod:`flwr_guard.audit.inputs`).
        labels: int ``(M,)`` class ids.
        plan: batch size, training, protections, attacks, budget, verdict rule.
        seed: seeds the choice of victims, stand-ins, noise and attack initialisation.
        device: where attacks run (``"auto"``: CUDA when available).
        victim_indices: ``(B,)`` positions in ``images`` to audit (default: drawn).
        modality: ``"auto"``, ``"image"``, ``"vector"`` or ``"tokens"``.

    Returns:
        An :class:`~flwr_guard.audit.report.AuditReport` (scores, verdict, and the
        best reconstruction of each victim, in memory only; ``setting["modality"]``).

    Raises:
        UnsupportedAuditInput: (a ``ValueError``) inputs or a model the audit cannot
            attack, named with type and shape: mismatched shapes, images outside
            ``[0, 1]``, token inputs without an ``nn.Embedding``, a model without a
            final ``nn.Linear`` or whose forward pass fails on the data.
        ValueError: a client with fewer than ``B + 1`` samples, bad victim indices, or
            an unavailable device.
    """
    started = time.monotonic()
    dev = resolve_device(device, fallback=False)
    data = prepare(images, labels, modality)
    _check_model(model, data)
    if data.inputs.shape[0] < plan.batch_size + 1:
        raise ValueError(
            f"the client has {data.inputs.shape[0]} samples; an audit of batch size "
            f"{plan.batch_size} needs at least {plan.batch_size + 1}"
        )
    inputs, labels_t = data.inputs, data.labels
    generator = torch.Generator().manual_seed(seed)
    num = inputs.shape[0]
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
    if data.low is not None:
        model = data.wrap_model(copy.deepcopy(model))

    with cpu_settings(dev, plan.cpu_threads):
        model = model.to(dev)
        params = {k: v.to(dev) for k, v in trainable_params(model).items()}
        scale = plan.training.learning_rate * plan.training.local_steps
        batches = [victim_indices, *others]
        deltas, norms = [], []
        for batch in batches:
            u = gradient_equivalent_update(
                model, params, inputs[batch].to(dev), labels_t[batch].to(dev), plan.training
            )
            delta = [-scale * t for t in u]
            deltas.append(delta)
            norms.append(float(update_norm(delta)))
        observed = observed_update(deltas, plan.protections, generator)
        observed_grad = [-t / scale for t in observed]
        victims, victim_labels = inputs[victim_indices], labels_t[victim_indices]
        if data.modality == "tokens":
            noise = plan.protections.noise_multiplier * (plan.protections.clipping_norm or 0.0)
            noise_grad = noise / plan.protections.aggregate_size / scale
            runs, best_images, baselines = _token_attack(
                model, params, observed_grad, victims, inputs, noise_grad)
        else:
            prior = mean_image(inputs)
            target = AttackTarget(
                model=model,
                params=params,
                observed=observed_grad,
                training=plan.training,
                num_images=plan.batch_size * plan.protections.aggregate_size,
                image_shape=tuple(inputs.shape[1:]),
                num_classes=_num_classes(model),
                prior_mean=prior.to(dev),
            )
            names = list(plan.attack_names)
            if plan.analytic and input_layers(model, params, tuple(inputs.shape[1:])):
                names.append("analytic")
            runs, best_images = _attack_all(
                target, plan, names, generator, data, victims, victim_labels, victim_indices,
                inputs, prior)
            baselines = {
                k: ScoreSet(v.psnr_db.tolist(), v.ssim.tolist())
                for k, v in baseline_scores(victims, inputs).items()
            }
    setting = {**plan.describe(), "modality": data.modality,
               "attacks": [r.name for r in runs]}
    return AuditReport(
        setting=setting,
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


def _check_model(model: nn.Module, data: AuditData) -> None:
    """A forward pass on two samples: the output must be ``(2, K)`` logits.

    Raises:
        UnsupportedAuditInput: naming the model and the input's type and shape.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedAuditInput(f"the audit needs a torch nn.Module, got {describe(model)}")
    if data.modality == "tokens" and not embedding_names(model):
        raise UnsupportedAuditInput(
            f"token inputs {describe(data.inputs)} need a model with an nn.Embedding; "
            f"{type(model).__name__} has none (pass modality='vector' for embeddings)")
    probe = data.inputs[:2]
    wrapped = data.wrap_model(copy.deepcopy(model)) if data.low is not None else model
    try:
        with torch.no_grad():
            out = wrapped(probe.to(next(model.parameters()).device))
    except Exception as err:
        raise UnsupportedAuditInput(
            f"{type(model).__name__} cannot run on the audit's inputs {describe(probe)} "
            f"({data.modality}): {type(err).__name__}: {err}") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
        raise UnsupportedAuditInput(
            f"{type(model).__name__} must return (batch, classes) logits; on inputs "
            f"{describe(probe)} it returned {describe(out)}")
    try:
        classes = _num_classes(model)
    except ValueError as err:
        raise UnsupportedAuditInput(str(err)) from err
    if classes != out.shape[1]:
        raise UnsupportedAuditInput(
            f"{type(model).__name__}'s last nn.Linear has {classes} outputs but the model "
            f"returns {out.shape[1]}: the audit needs the classifier to be the last nn.Linear")
    if int(data.labels.max()) >= classes or int(data.labels.min()) < 0:
        raise UnsupportedAuditInput(
            f"labels must be class ids in [0, {classes}), got range "
            f"[{int(data.labels.min())}, {int(data.labels.max())}]")


def _token_attack(
    model: nn.Module, params: dict[str, torch.Tensor], observed: list[torch.Tensor],
    victims: torch.Tensor, pool: torch.Tensor, noise_std: float,
) -> tuple[list[AttackRun], torch.Tensor, dict[str, ScoreSet]]:
    start = time.monotonic()
    name = embedding_names(model)[0]
    by_name = dict(zip(params, observed))
    vocab = int(params[name].shape[0])
    found = recovered_tokens(by_name[name], noise_std)
    f1 = token_f1(found, victims, vocab)
    base = frequent_tokens_f1(victims, pool, vocab)
    nan = [math.nan] * victims.shape[0]
    run = AttackRun(
        name="embedding-rows",
        scores=ScoreSet([], list(nan), token_f1=f1.tolist()),
        seconds=time.monotonic() - start, iterations=0, stopped_by_budget=False,
        loss=float(found.numel()),
    )
    baselines = {"frequent-tokens": ScoreSet([], list(nan), token_f1=base.tolist())}
    recovered = torch.zeros((1, vocab))
    recovered[0, found] = 1.0
    return [run], recovered, baselines


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
    names: list[str],
    generator: torch.Generator,
    data: AuditData,
    victims: torch.Tensor,
    victim_labels: torch.Tensor,
    victim_indices: torch.Tensor,
    pool: torch.Tensor,
    prior: torch.Tensor,
) -> tuple[list[AttackRun], torch.Tensor]:
    attacks = build_attacks(names, plan.effort)
    start = time.monotonic()
    runs: list[AttackRun] = []
    best_psnr = torch.full((victims.shape[0],), -float("inf"))
    best_images = victims.new_zeros(victims.shape)
    originals = data.original_units(victims)
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
        estimates = data.original_units(scored.images)
        runs.append(
            AttackRun(
                name=rec.attack,
                scores=ScoreSet(
                    scored.psnr_db.tolist(),
                    scored.ssim.tolist(),
                    scored.identified.tolist(),
                    scored.label_correct.tolist(),
                    rel_l2=relative_l2_error(estimates, originals).tolist(),
                    cosine=cosine(estimates, originals).tolist(),
                    recovered=recovered_fraction(scored.images, victims).tolist(),
                ),
                seconds=rec.seconds,
                iterations=rec.iterations,
                stopped_by_budget=rec.stopped_by_budget,
                loss=rec.loss,
            )
        )
    return runs, best_images
