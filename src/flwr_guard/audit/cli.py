"""``flwr-guard audit`` (registered in flwr_guard.cli).

Heavy imports (torch, the attacks) happen inside the commands, so ``flwr-guard --help``
stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True)


def _split(value: str, cast: type = str) -> tuple:
    return tuple(cast(v.strip()) for v in value.split(",") if v.strip())


ALL_DEFENCES = "none,clip,dp-0.001,dp-0.01,dp-0.1,dp-1,secagg-4,secagg-16"
OutOpt = Annotated[Path, typer.Option(help="Folder for audit.json, audit.md and the PNG grids.")]
ModelsOpt = Annotated[str, typer.Option(help="Comma-separated: digits-cnn, lenet.")]
SizesOpt = Annotated[
    str, typer.Option(help="Comma-separated image sizes (8 = the digits, larger = upsampled).")
]
DefencesOpt = Annotated[str, typer.Option(help=f"Comma-separated, from: {ALL_DEFENCES}.")]
BatchOpt = Annotated[str, typer.Option(help="Comma-separated batch sizes.")]
AuditsOpt = Annotated[int, typer.Option(min=1, help="Audits (victim batches) per cell.")]
EffortOpt = Annotated[
    float, typer.Option(min=0.01, help="Scale of every attack's iteration count.")
]
BudgetOpt = Annotated[
    float, typer.Option(min=0.0, help="Time budget per audit in seconds (0 = none).")
]
AttacksOpt = Annotated[str, typer.Option(help="Comma-separated attack names ('' = defaults).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of data, models, victims, noise and attacks.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]


def audit_command(
    out: OutOpt = Path("audit-report"),
    models: ModelsOpt = "digits-cnn,lenet",
    sizes: SizesOpt = "8,28",
    defences: DefencesOpt = ALL_DEFENCES,
    batch_sizes: BatchOpt = "1,4",
    audits: AuditsOpt = 2,
    effort: EffortOpt = 0.5,
    budget: BudgetOpt = 30.0,
    attacks: AttacksOpt = "",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Attack unprotected and protected updates on real digits; write the report.

    Sweeps defences (none, clipping, DP noise, SecAgg aggregates) x batch sizes x
    models x image sizes, runs the gradient-inversion attacks on each and scores them
    (PSNR, SSIM, identification, labels) against the victims and the no-information
    baselines. Writes JSON, a Markdown table and PNG grids to --out.
    """
    from flwr_guard.audit.sweep import SweepOptions, run_cell
    from flwr_guard.audit.sweep_report import markdown_table, write_all
    from flwr_guard.device import resolve_device

    try:
        resolve_device(device, fallback=False)
        options = SweepOptions(
            models=_split(models), image_sizes=_split(sizes, int), defences=_split(defences),
            batch_sizes=_split(batch_sizes, int), audits=audits, effort=effort,
            time_budget_s=budget or None, attacks=_split(attacks) or None, seed=seed,
            device=device,
        )
        from flwr_guard.audit.suite import attacks_for

        attacks_for(options.training.local_steps, options.attacks)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    cells = options.cells()
    results = []
    started = time.monotonic()
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("auditing", total=len(cells))
        for cell in cells:
            progress.update(task, description=f"auditing {cell.key}")
            report = run_cell(cell, options)
            results.append((cell, report))
            verdict = "[red]leaks[/red]" if report.leaks else "[green]no leak[/green]"
            progress.console.print(
                f"{cell.key}: PSNR {report.worst.mean_psnr_db:.1f} dB "
                f"({report.psnr_gain_db:+.1f} vs mean image), identified "
                f"{report.worst.identified_rate:.0%}: {verdict}"
            )
            progress.advance(task)
    written = write_all(results, options, time.monotonic() - started, out)
    typer.echo(markdown_table(results))
    console.print("wrote " + ", ".join(str(p) for p in written))
