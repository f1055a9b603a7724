"""``flwr-guard robustness`` (registered in flwr_guard.cli): the robustness study offline.

Trains the reference app's digits CNN with each objective (or loads a saved state dict),
evaluates it (FGSM, PGD with restarts, SPSA, Square, the masking detector), scores its
explanations and writes ``robustness.json``, ``robustness.md``,
``robustness_accuracy.png`` and ``robustness_attributions.png`` under ``--out``.
Heavy imports happen inside the command, so ``flwr-guard --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console(stderr=True)


def _objective(spec: str, eps: float, lam: float, steps: int):
    from flwr_guard.robust.objectives import RobustObjective

    return RobustObjective(spec, eps=eps, lam=lam, steps=steps)


def robustness_command(
    objectives: Annotated[
        str, typer.Option(help="Comma-separated: plain, cure, scorpio, pgd-at.")
    ] = "plain,cure,scorpio,pgd-at",
    train_eps: Annotated[float, typer.Option(help="L-inf radius of the robust objectives (pixels in [0, 1]).")] = 0.1,
    cure_lambda: Annotated[float, typer.Option(help="lambda of CURE.")] = 4.0,
    scorpio_lambda: Annotated[float, typer.Option(help="lambda of SCORPIO.")] = 1.0,
    pgd_steps: Annotated[int, typer.Option(help="PGD steps of PGD-AT.")] = 5,
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 6,
    eps: Annotated[str, typer.Option(help="Comma-separated evaluation radii in (0, 1).")] = "0.05,0.1,0.2",
    zo_examples: Annotated[int, typer.Option(min=1, help="Test images the zeroth-order attacks use.")] = 100,
    test_examples: Annotated[int, typer.Option(min=1, help="Test images evaluated (of 360).")] = 360,
    state_dict: Annotated[Path | None, typer.Option(
        help="Evaluate this saved DigitsCNN state dict (torch.save) instead of training.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
    out: Annotated[Path, typer.Option(help="Folder for the JSON, Markdown and PNG files.")] = Path("robustness"),
) -> None:
    """Robust accuracy, the gradient-masking detector and attribution scores, offline."""
    import torch
    from sklearn.datasets import load_digits

    from flwr_guard.models.digits_cnn import DigitsCNN  # the reference app's model
    from flwr_guard.robust.evaluation import AttackSettings, evaluate_robustness
    from flwr_guard.robust.report import (
        markdown_table,
        plot_attributions,
        plot_robust_accuracy,
        write_json,
    )
    from flwr_guard.robust.study import StudyPlan, attribution_maps, run_study

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x_tr, y_tr, x_te, y_te = x[order[:1437]], y[order[:1437]], x[order[1437:]], y[order[1437:]]
    x_te, y_te = x_te[:test_examples], y_te[:test_examples]
    radii = tuple(float(e) for e in eps.split(",") if e.strip())
    attacks = AttackSettings(zeroth_order_examples=zo_examples, spsa_steps=30, spsa_samples=16)
    try:
        if state_dict is not None:
            model = DigitsCNN()
            model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
            model.to(device)
            result = evaluate_robustness(model, x_te.to(device), y_te.to(device), radii, attacks)
            record: dict[str, Any] = {
                "settings": {"state_dict": str(state_dict), "eps": list(radii)},
                "models": [{"objective": state_dict.name, "seed": 0, **result.to_dict()}]}
            trained: dict[str, torch.nn.Module] = {state_dict.name: model}
        else:
            lams = {"cure": cure_lambda, "scorpio": scorpio_lambda}
            plan = StudyPlan(
                objectives=tuple(_objective(o.strip(), train_eps, lams.get(o.strip(), 1.0),
                                            pgd_steps if o.strip() == "pgd-at" else 1)
                                 for o in objectives.split(",") if o.strip()),
                seeds=tuple(int(s) for s in seeds.split(",") if s.strip()),
                epochs=epochs, eps=radii, attacks=attacks, device=device,
                attribution_examples=min(32, test_examples))
            record, trained = run_study(
                DigitsCNN, x_tr, y_tr, x_te, y_te, plan,
                on_model=lambda e: console.print(
                    f"{e['objective']} seed {e['seed']}: clean {e['clean_accuracy']:.3f}, "
                    f"masking suspected: {e['masking']['suspected']}"))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, out / "robustness.json")
    table = markdown_table(record)
    (out / "robustness.md").write_text(table)
    plot_robust_accuracy(record, out / "robustness_accuracy.png")
    first = dict(list(trained.items())[: len(trained) // max(len(record["settings"].get("seeds", [0])), 1)])
    maps = attribution_maps(first, x_te[:3].to(device), y_te[:3].to(device))
    plot_attributions(x_te[:3, 0].numpy(), maps, out / "robustness_attributions.png")
    print(table)
    console.print(f"wrote {out}/robustness.json, robustness.md, robustness_accuracy.png, robustness_attributions.png")
