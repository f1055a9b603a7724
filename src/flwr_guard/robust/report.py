"""Reports of a robustness study: JSON, a Markdown table, PNG figures (no Flower imports).

The study's record (what :func:`flwr_guard.robust.study.run_study` returns) is a dict::

    {"settings": {...}, "models": [{"objective", "seed", "clean_accuracy",
      "robust_accuracy": {attack: {eps: acc}}, "masking": {...}, "attribution_scores":
      {method: {score: value}}, "seconds_per_step", "cost_ratio"}, ...], "controls": [...]}

:func:`markdown_table` averages over seeds (mean ± std where there are several).
Figures: :func:`plot_robust_accuracy` (robust accuracy against eps per objective and
attack) and :func:`plot_attributions` (maps of every method, side by side, per model).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def write_json(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def _by_objective(models: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for m in models:
        out[m["objective"]].append(m)
    return dict(out)


def _ms(values: list[float], pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    v = np.asarray(values, float) * scale
    if len(v) == 1:
        return f"{v[0]:.1f}" if pct else f"{v[0]:.2f}"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if pct else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def markdown_table(record: dict[str, Any]) -> str:
    """Accuracy (%) per objective: clean, each attack at each eps, detector verdicts and
    the step-cost ratio; then the attribution scores per objective and method."""
    models = record["models"]
    groups = _by_objective(models)
    attacks = list(models[0]["robust_accuracy"])
    eps = sorted({float(e) for m in models for a in attacks for e in m["robust_accuracy"][a]
                  if float(e) < 1.0})
    head = ["objective", "seeds", "clean"] + [f"{a} {e:g}" for a in attacks for e in eps] + [
        "masking suspected", "step cost (x plain)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, ms in groups.items():
        row = [objective, str(len(ms)), _ms([m["clean_accuracy"] for m in ms])]
        for a in attacks:
            for e in eps:
                row.append(_ms([m["robust_accuracy"][a][str(e)] if str(e) in m["robust_accuracy"][a]
                                else m["robust_accuracy"][a][e] for m in ms]))
        row.append(f"{sum(m['masking']['suspected'] for m in ms)}/{len(ms)}")
        row.append(_ms([m.get("cost_ratio", float("nan")) for m in ms], pct=False))
        lines.append("| " + " | ".join(row) + " |")
    scores = [m for m in models if m.get("attribution_scores")]
    if scores:
        methods = list(scores[0]["attribution_scores"])
        names = list(scores[0]["attribution_scores"][methods[0]])
        lines += ["", "| objective | method | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for objective, ms in _by_objective(scores).items():
            for method in methods:
                vals = [_ms([m["attribution_scores"][method][n] for m in ms], pct=False) for n in names]
                lines.append(f"| {objective} | {method} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_robust_accuracy(record: dict[str, Any], path: Path) -> Path:
    """Robust accuracy (mean over seeds) against eps, one panel per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = record["models"]
    attacks = list(models[0]["robust_accuracy"])
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3), sharey=True)
    for ax, attack in zip(np.atleast_1d(axes), attacks):
        for objective, ms in _by_objective(models).items():
            eps = sorted(float(e) for e in ms[0]["robust_accuracy"][attack] if float(e) < 1.0)
            acc = [np.mean([m["robust_accuracy"][attack][str(e)] for m in ms]) for e in eps]
            ax.plot([0.0, *eps], [np.mean([m["clean_accuracy"] for m in ms]), *acc], "o-", label=objective)
        ax.set_title(attack)
        ax.set_xlabel("eps (L-inf, pixels in [0, 1])")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attributions(images: np.ndarray, maps: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """A grid: one row per (model, image), the image then every method's map.

    Args:
        images: ``(N, H, W)`` in ``[0, 1]``.
        maps: ``{model label: {method: (N, H, W)}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(maps)
    methods = list(maps[labels[0]])
    rows = [(label, i) for label in labels for i in range(images.shape[0])]
    fig, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(1.6 * (1 + len(methods)), 1.6 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, (label, i) in enumerate(rows):
        axes[r, 0].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(label, fontsize=7)
        for c, method in enumerate(methods, start=1):
            m = maps[label][method][i]
            lim = float(np.abs(m).max()) or 1.0
            axes[r, c].imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
            if r == 0:
                axes[r, c].set_title(method, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
