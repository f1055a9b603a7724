"""Files of ``flwr-guard audit``: JSON, a Markdown table, PNG grids of originals vs
reconstructions (matplotlib, Agg backend; images only in the PNG, never in JSON)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from flwr_guard.audit.report import AuditReport
from flwr_guard.audit.sweep import SweepCell, SweepOptions

Results = list[tuple[SweepCell, AuditReport]]


def results_json(results: Results, options: SweepOptions, seconds: float) -> dict[str, Any]:
    """The sweep as JSON-ready data."""
    return {
        "options": {
            "models": list(options.models),
            "image-sizes": list(options.image_sizes),
            "defences": list(options.defences),
            "batch-sizes": list(options.batch_sizes),
            "audits-per-cell": options.audits,
            "effort": options.effort,
            "time-budget-s": options.time_budget_s,
            "pool-size": options.pool_size,
            "seed": options.seed,
            "device": options.device,
        },
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "seconds": round(seconds, 1),
        "cells": [{"cell": cell.key, **report.to_dict()} for cell, report in results],
    }


def markdown_table(results: Results) -> str:
    """One row per cell: worst-case scores, baseline, verdict."""
    head = (
        "| model | image | defence | B | PSNR (dB) | vs mean image (dB) | SSIM | identified "
        "| label acc. | strongest attack | verdict | time (s) |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |\n"
    )
    rows = []
    for cell, rep in results:
        rows.append(
            f"| {cell.model} | {cell.image_size}x{cell.image_size} | {cell.defence} "
            f"| {cell.batch_size} | {rep.worst.mean_psnr_db:.1f} | {rep.psnr_gain_db:+.1f} "
            f"| {rep.worst.mean_ssim:.2f} | {rep.worst.identified_rate:.0%} "
            f"| {rep.worst.label_accuracy:.0%} | {rep.strongest_attack} "
            f"| {'**leaks**' if rep.leaks else 'no leak'} | {rep.seconds:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


def write_grid(results: Results, path: Path, batch_size: int, max_victims: int = 4) -> bool:
    """PNG grid for one batch size: a column block per (model, image size), a row per
    defence (first row: the originals). Returns False if no cell has that batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(c, r) for c, r in results if c.batch_size == batch_size and r.originals is not None]
    if not cells:
        return False
    blocks = list(dict.fromkeys((c.model, c.image_size) for c, _ in cells))
    defences = list(dict.fromkeys(c.defence for c, _ in cells))
    by_key = {(c.model, c.image_size, c.defence): r for c, r in cells}
    victims = min(max_victims, min(r.num_victims for _, r in cells))
    rows, cols = 1 + len(defences), len(blocks) * victims
    fig, axes = plt.subplots(rows, cols, figsize=(max(0.9 * cols + 1.6, 4.5), 0.9 * rows + 0.6),
                             squeeze=False)
    for b, (model, size) in enumerate(blocks):
        first = next(r for (m, s, _), r in by_key.items() if (m, s) == (model, size))
        for v in range(victims):
            col = b * victims + v
            assert first.originals is not None  # cells hold only results with originals
            axes[0][col].imshow(first.originals[v, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            if v == 0:
                axes[0][col].set_title(f"{model} {size}px", fontsize=7, loc="left")
            for d, defence in enumerate(defences, start=1):
                rep = by_key.get((model, size, defence))
                if rep is not None and rep.reconstructions is not None:
                    image = rep.reconstructions[v, 0].numpy()
                    axes[d][col].imshow(image, cmap="gray", vmin=0, vmax=1)
    for r in range(rows):
        axes[r][0].set_ylabel("original" if r == 0 else defences[r - 1], fontsize=7,
                              rotation=0, ha="right", va="center")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"best reconstruction per victim (batch size {batch_size})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: Results, options: SweepOptions, seconds: float, out_dir: Path) -> list[Path]:
    """Write ``audit.json``, ``audit.md`` and ``audit_grid_b{B}.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = out_dir / "audit.json"
    json_path.write_text(json.dumps(results_json(results, options, seconds), indent=2) + "\n")
    written.append(json_path)
    md_path = out_dir / "audit.md"
    md_path.write_text(markdown_table(results))
    written.append(md_path)
    for batch in options.batch_sizes:
        png = out_dir / f"audit_grid_b{batch}.png"
        if write_grid(results, png, batch):
            written.append(png)
    return written
