"""What an audit reports: per-victim scores of every attack, the worst case, the
baselines and the verdict. Scores only — the images stay in memory for plots and are
never serialised into metrics or JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flwr_guard.audit.verdict import VerdictRule
from flwr_guard.keys import ReplyMetrics


def _mean(values: list[float] | list[bool]) -> float:
    return float(sum(float(v) for v in values) / len(values)) if values else 0.0


def _opt_mean(values: list[float]) -> float:
    """Mean, NaN for no values ("not applicable")."""
    return _mean(values) if values else math.nan


def _nan_max(values: tuple[float, ...]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _nan_min(values: tuple[float, ...]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


@dataclass
class ScoreSet:
    """Per-victim scores (one entry per victim, same order everywhere).

    ``ssim`` entries are NaN where SSIM does not apply (vectors, tiny images); the
    vector scores (:mod:`flwr_guard.audit.vector_scores`) and ``token_f1``
    (:mod:`flwr_guard.audit.token_attack`) are empty where they do not apply.
    """

    psnr_db: list[float]
    ssim: list[float]
    identified: list[bool] = field(default_factory=list)
    label_correct: list[bool] = field(default_factory=list)
    rel_l2: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    recovered: list[float] = field(default_factory=list)
    token_f1: list[float] = field(default_factory=list)

    @property
    def mean_psnr_db(self) -> float:
        return _mean(self.psnr_db)

    @property
    def mean_ssim(self) -> float:
        return _mean(self.ssim)

    @property
    def identified_rate(self) -> float:
        return _mean(self.identified)

    @property
    def label_accuracy(self) -> float:
        return _mean(self.label_correct)

    @property
    def mean_rel_l2(self) -> float:
        return _opt_mean(self.rel_l2)

    @property
    def mean_cosine(self) -> float:
        return _opt_mean(self.cosine)

    @property
    def mean_recovered(self) -> float:
        return _opt_mean(self.recovered)

    @property
    def mean_token_f1(self) -> float:
        return _opt_mean(self.token_f1)

    def extend(self, other: ScoreSet) -> None:
        self.psnr_db += other.psnr_db
        self.ssim += other.ssim
        self.identified += other.identified
        self.label_correct += other.label_correct
        self.rel_l2 += other.rel_l2
        self.cosine += other.cosine
        self.recovered += other.recovered
        self.token_f1 += other.token_f1

    def summary(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        if self.psnr_db:
            out["psnr-db"] = round(self.mean_psnr_db, 3)
        if self.ssim and not math.isnan(self.mean_ssim):
            out["ssim"] = round(self.mean_ssim, 4)
        if self.identified:
            out["identified-rate"] = round(self.identified_rate, 4)
        if self.label_correct:
            out["label-accuracy"] = round(self.label_accuracy, 4)
        for key, values in (("rel-l2-error", self.rel_l2), ("cosine", self.cosine),
                            ("recovered-fraction", self.recovered), ("token-f1", self.token_f1)):
            if values:
                out[key] = round(_mean(values), 4)
        return out


def worst_case(runs: list[AttackRun]) -> ScoreSet:
    """Per victim, the highest PSNR and SSIM and any identification / correct label
    over ``runs`` (each score maximised separately: an upper bound, as an audit wants).

    Raises:
        ValueError: for no runs.
    """
    if not runs:
        raise ValueError("no attack ran")
    sets = [r.scores for r in runs]

    def per_victim(name: str, pick: Any) -> list[Any]:
        columns = [getattr(s, name) for s in sets if getattr(s, name)]
        return [pick(v) for v in zip(*columns)] if columns else []

    return ScoreSet(
        psnr_db=per_victim("psnr_db", _nan_max),
        ssim=per_victim("ssim", _nan_max),
        identified=per_victim("identified", any),
        label_correct=per_victim("label_correct", any),
        rel_l2=per_victim("rel_l2", _nan_min),
        cosine=per_victim("cosine", _nan_max),
        recovered=per_victim("recovered", _nan_max),
        token_f1=per_victim("token_f1", _nan_max),
    )


@dataclass
class AttackRun:
    """One attack's result in an audit."""

    name: str
    scores: ScoreSet
    seconds: float
    iterations: int
    stopped_by_budget: bool
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.name,
            **self.scores.summary(),
            "seconds": round(self.seconds, 3),
            "iterations": self.iterations,
            "stopped-by-budget": self.stopped_by_budget,
            "loss": self.loss if math.isfinite(self.loss) else None,
        }


@dataclass
class AuditReport:
    """The outcome of one audit (or of several pooled with :meth:`combine`).

    Attributes:
        setting: what was audited (protections, batch size, local steps, ...).
        attacks: one :class:`AttackRun` per attack that ran.
        worst: per-victim worst case over the attacks.
        baselines: ``"mean-image"`` and ``"flat-mean"`` scores (PSNR, SSIM).
        chance_identification: ``1 / M`` for ``M`` samples in the client's data.
        update_norms: L2 norm of each audited client update before clipping.
        seconds: wall time of the audit(s).
        rule: the verdict rule applied.
        originals, reconstructions: ``(V, C, H, W)`` victims and, per victim, the
            reconstruction with the highest PSNR (for plots; never serialised).
    """

    setting: dict[str, Any]
    attacks: list[AttackRun]
    worst: ScoreSet
    baselines: dict[str, ScoreSet]
    chance_identification: float
    update_norms: list[float]
    seconds: float
    rule: VerdictRule = field(default_factory=VerdictRule)
    originals: torch.Tensor | None = field(default=None, repr=False)
    reconstructions: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_victims(self) -> int:
        return len(self.worst.psnr_db)

    @property
    def modality(self) -> str:
        return str(self.setting.get("modality", "image"))

    @property
    def psnr_gain_db(self) -> float:
        """Worst-case mean PSNR minus the mean-image baseline's (dB); NaN for tokens."""
        if not self.worst.psnr_db:
            return math.nan
        return self.worst.mean_psnr_db - self.baselines["mean-image"].mean_psnr_db

    @property
    def token_f1_gain(self) -> float:
        """Worst-case token F1 minus the frequent-tokens baseline's; NaN for non-text."""
        base = self.baselines.get("frequent-tokens")
        if not self.worst.token_f1 or base is None:
            return math.nan
        return self.worst.mean_token_f1 - base.mean_token_f1

    @property
    def verdict(self) -> tuple[bool, str]:
        if self.modality == "tokens":
            return self.rule.judge_tokens(self.worst.mean_token_f1, self.token_f1_gain)
        return self.rule.judge(self.worst.identified_rate, self.psnr_gain_db)

    @property
    def leaks(self) -> bool:
        return self.verdict[0]

    @property
    def strongest_attack(self) -> str:
        """The attack with the highest mean PSNR (token F1 for text)."""
        if self.modality == "tokens":
            return max(self.attacks, key=lambda r: r.scores.mean_token_f1).name
        return max(self.attacks, key=lambda r: r.scores.mean_psnr_db).name

    @classmethod
    def combine(cls, reports: list[AuditReport]) -> AuditReport:
        """Pool the victims of several audits of the same setting and attacks.

        Raises:
            ValueError: for no reports or reports with different attack lists.
        """
        if not reports:
            raise ValueError("no reports to combine")
        names = [r.name for r in reports[0].attacks]
        if any([r.name for r in rep.attacks] != names for rep in reports):
            raise ValueError("reports ran different attacks")
        empty = lambda: ScoreSet([], [], [], [], [], [], [], [])  # noqa: E731
        runs = [AttackRun(n, empty(), 0.0, 0, False, 0.0) for n in names]
        worst, baselines = empty(), {k: empty() for k in reports[0].baselines}
        for rep in reports:
            for run, part in zip(runs, rep.attacks):
                run.scores.extend(part.scores)
                run.seconds += part.seconds
                run.iterations += part.iterations
                run.stopped_by_budget |= part.stopped_by_budget
                run.loss = max(run.loss, part.loss)
            worst.extend(rep.worst)
            for key, base in rep.baselines.items():
                baselines[key].extend(base)
        images = [r.originals for r in reports if r.originals is not None]
        recons = [r.reconstructions for r in reports if r.reconstructions is not None]
        return cls(
            setting=dict(reports[0].setting),
            attacks=runs,
            worst=worst,
            baselines=baselines,
            chance_identification=_mean([r.chance_identification for r in reports]),
            update_norms=[n for r in reports for n in r.update_norms],
            seconds=sum(r.seconds for r in reports),
            rule=reports[0].rule,
            originals=torch.cat(images) if images else None,
            reconstructions=torch.cat(recons) if recons else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (scores, no images)."""
        leaks, reason = self.verdict
        return {
            "setting": self.setting,
            "victims": self.num_victims,
            "leaks": leaks,
            "verdict": reason,
            "worst": {**self.worst.summary(), "strongest-attack": self.strongest_attack},
            "psnr-gain-db": None if math.isnan(self.psnr_gain_db) else round(self.psnr_gain_db, 3),
            "baselines": {k: v.summary() for k, v in self.baselines.items()},
            "chance-identification": round(self.chance_identification, 5),
            "attacks": [r.to_dict() for r in self.attacks],
            "update-norm": round(_mean(self.update_norms), 5),
            "seconds": round(self.seconds, 3),
            "per-victim": {
                "psnr-db": [round(v, 3) for v in self.worst.psnr_db],
                "identified": self.worst.identified,
            },
        }

    def to_metrics(self) -> dict[str, float | int]:
        """Flat scores for a Flower ``MetricRecord``: the keys of :func:`neutral_metrics`."""
        leaks, _ = self.verdict
        base = self.baselines.get("mean-image")
        nan = math.nan
        return {
            ReplyMetrics.AUDIT_RAN: 1,
            ReplyMetrics.AUDIT_ERROR: 0,
            ReplyMetrics.AUDIT_LEAKS: int(leaks),
            ReplyMetrics.AUDIT_PSNR_DB: float(self.worst.mean_psnr_db) if self.worst.psnr_db else nan,
            ReplyMetrics.AUDIT_PSNR_GAIN_DB: float(self.psnr_gain_db),
            ReplyMetrics.AUDIT_SSIM: float(self.worst.mean_ssim) if self.worst.ssim else nan,
            ReplyMetrics.AUDIT_IDENTIFIED_RATE: float(self.worst.identified_rate),
            ReplyMetrics.AUDIT_LABEL_ACCURACY: float(self.worst.label_accuracy),
            ReplyMetrics.AUDIT_BASELINE_PSNR_DB: float(base.mean_psnr_db) if base is not None
            and base.psnr_db else nan,
            ReplyMetrics.AUDIT_REL_L2_ERROR: float(self.worst.mean_rel_l2),
            ReplyMetrics.AUDIT_COSINE: float(self.worst.mean_cosine),
            ReplyMetrics.AUDIT_RECOVERED_FRACTION: float(self.worst.mean_recovered),
            ReplyMetrics.AUDIT_TOKEN_F1: float(self.worst.mean_token_f1),
            ReplyMetrics.AUDIT_SECONDS: float(self.seconds),
        }


def neutral_metrics() -> dict[str, float | int]:
    """The audit's metric keys with neutral values, for replies that were not audited
    (FedAvg needs the same keys in every reply). ``audit-error`` is set to 1 by the mod
    when an audit was due but failed. In an audited reply a score that does not apply to
    the modality is NaN (SSIM of a vector, PSNR of tokens, token F1 of an image)."""
    return {
        ReplyMetrics.AUDIT_RAN: 0,
        ReplyMetrics.AUDIT_ERROR: 0,
        ReplyMetrics.AUDIT_LEAKS: 0,
        ReplyMetrics.AUDIT_PSNR_DB: 0.0,
        ReplyMetrics.AUDIT_PSNR_GAIN_DB: 0.0,
        ReplyMetrics.AUDIT_SSIM: 0.0,
        ReplyMetrics.AUDIT_IDENTIFIED_RATE: 0.0,
        ReplyMetrics.AUDIT_LABEL_ACCURACY: 0.0,
        ReplyMetrics.AUDIT_BASELINE_PSNR_DB: 0.0,
        ReplyMetrics.AUDIT_REL_L2_ERROR: 0.0,
        ReplyMetrics.AUDIT_COSINE: 0.0,
        ReplyMetrics.AUDIT_RECOVERED_FRACTION: 0.0,
        ReplyMetrics.AUDIT_TOKEN_F1: 0.0,
        ReplyMetrics.AUDIT_SECONDS: 0.0,
    }
