"""The ``flwr-guard`` command."""

from __future__ import annotations

import signal
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flwr_guard.audit.cli import audit_command
from flwr_guard.demo import DemoOptions, DemoState, run_demo
from flwr_guard.deployment import PortInUseError
from flwr_guard.deployment.provision_cli import (
    provision_command,
    provision_device_command,
    signing_key_command,
)
from flwr_guard.dp.cli import epsilon as dp_epsilon_command
from flwr_guard.dp.cli import ledger_app
from flwr_guard.inspection.cli import audit_endpoints_command
from flwr_guard.keys import ReplyMetrics, RunConfig, ServerMetrics
from flwr_guard.node.cli import node_app
from flwr_guard.robust.cli import robustness_command

app = typer.Typer(
    name="flwr-guard",
    help="Secure aggregation, differential privacy, leakage audits and telemetry for Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
app.command("epsilon")(dp_epsilon_command)
app.command("audit")(audit_command)
app.command("audit-endpoints")(audit_endpoints_command)
app.command("robustness")(robustness_command)
app.add_typer(ledger_app, name="ledger")
app.add_typer(node_app, name="node")
app.command("provision")(provision_command)
app.command("provision-device")(provision_device_command)
app.command("signing-key")(signing_key_command)


class Partition(str, Enum):
    iid = "iid"
    dirichlet = "dirichlet"


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _audit_cell(train: dict) -> str:
    ran = train.get(ReplyMetrics.AUDIT_RAN)
    if not ran:
        return "-"
    leaks, gain = train.get(ReplyMetrics.AUDIT_LEAKS, 0), train.get(ReplyMetrics.AUDIT_PSNR_GAIN_DB, 0)
    return f"{int(leaks)}/{int(ran)}, {gain:+.1f} dB"


def _robust_cell(server: dict) -> str:
    """The server's robustness evaluation of the round (docs/robustness.md), if it ran."""
    acc = server.get(ServerMetrics.robust_accuracy("pgd", 0.1))
    if acc is None:
        return "-"
    return f"{acc:.3f} ({'yes' if server.get(ServerMetrics.ROBUST_MASKING_SUSPECTED) else 'no'})"


COLUMNS = ("round", "train\nloss", "test\nloss", "test\nacc.", "ε record\n/ budget",
           "SecAgg+\nsurvivors", "audit: leaks/ran,\nPSNR gain", "PGD acc. eps 0.1\n(masking?)",
           "time\n(s)")


def _round_cells(line: dict, rounds: int) -> list[str]:
    eps = line.get("train", {}).get(ReplyMetrics.DP_SGD_EPSILON)
    budget = line.get("privacy", {}).get(RunConfig.DP_SGD_MAX_EPSILON)
    secagg = line.get("secagg") or {}
    return [
        f"{line['round']}/{rounds}",
        _fmt(line.get("train", {}).get("train-loss"), ".4f"),
        _fmt(line.get("server", {}).get("test-loss"), ".4f"),
        _fmt(line.get("server", {}).get("test-accuracy"), ".3f"),
        f"{_fmt(eps, '.2f')} / {_fmt(budget or None, '.1f')}" if eps is not None else "-",
        f"{secagg['survivors']}/{secagg['cohort']}" if secagg else "-",
        _audit_cell(line.get("train", {})),
        _robust_cell(line.get("server", {})),
        _fmt(line.get("elapsed-s"), ".1f"),
    ]


def _progress_view(state: DemoState, rounds: int) -> Group:
    table = Table(title="flwr-guard demo", expand=False)
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for line in state.rounds:
        table.add_row(*_round_cells(line, rounds))
    caption = Text(
        f"{state.phase} · run {state.run_id or '-'} · status {state.status} · "
        f"{state.elapsed_s:.0f} s\nmetrics {state.metrics_url or '-'} · Prometheus "
        f"{state.prometheus_url or 'not running (make tools installs it)'}"
        + (f"\nlost (the run goes on without them): {', '.join(state.lost_nodes)}"
           if state.lost_nodes else "")
    )
    return Group(table, caption)


class _PlainProgress:
    """Progress for an output that is not a terminal (CI, a pipe, a log file): one plain
    line per phase change and per round, printed as it happens."""

    def __init__(self, rounds: int) -> None:
        self.rounds, self.printed, self.phase, self.events = rounds, 0, "", 0

    def __call__(self, state: DemoState) -> None:
        if state.phase != self.phase:
            self.phase = state.phase
            typer.echo(f"demo: {state.phase} (run {state.run_id or '-'}, {state.elapsed_s:.0f} s)")
        for event in state.node_events[self.events:]:
            if event["event"] == "lost":
                typer.echo(f"demo: {event['node']} (node {event['node-id']}) exited with code "
                           f"{event['exit-code']}; the run goes on without it (a SecAgg+ dropout)")
            else:
                typer.echo(f"demo: {event['node']} restarted; it joins a later round")
        self.events = len(state.node_events)
        for line in state.rounds[self.printed:]:
            cells = _round_cells(line, self.rounds)
            typer.echo("demo: " + " · ".join(
                f"{name.replace(chr(10), ' ')} {cell}" for name, cell in zip(COLUMNS, cells)))
        self.printed = len(state.rounds)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    """flwr-guard: protect what Flower clients share."""
    if version:
        from flwr_guard import __version__

        typer.echo(__version__)
        raise typer.Exit()


def _raise_keyboard_interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(min=1, help="Number of SuperNodes (data partitions).")] = 4,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    partition: Annotated[Partition, typer.Option(help="How the data is split.")] = Partition.iid,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration α (> 0).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the data split and the model.")] = 42,
    summary: Annotated[
        Path, typer.Option(help="Where to write the JSON summary.")
    ] = Path("demo-summary.json"),
    simulation: Annotated[
        bool, typer.Option("--simulation", help="Use Flower's Ray simulation instead.")
    ] = False,
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="SuperLink port (0 = pick a free one).")
    ] = 0,
    app_dir: Annotated[
        Path | None,
        typer.Option("--app", exists=True, file_okay=False, help="Run another Flower app."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Training device of every SuperNode: cpu or cuda.")
    ] = "cpu",
    keep_workdir: Annotated[
        bool, typer.Option("--keep-workdir", help="Keep logs even when the run succeeds.")
    ] = False,
    prometheus: Annotated[
        bool, typer.Option(help="Scrape the run's metrics with a local Prometheus (if installed).")
    ] = True,
    dp_sgd: Annotated[
        bool, typer.Option(help="Record-level DP-SGD on every node (the app's default).")
    ] = True,
    robust_objective: Annotated[
        str, typer.Option(help="Robust training: plain, cure, scorpio or pgd-at (not with DP-SGD).")
    ] = "plain",
    robust_eval_every: Annotated[
        int, typer.Option(min=0, help="Robustness evaluation by the server every k rounds (0 = off).")
    ] = 0,
    audit: Annotated[
        bool, typer.Option(help="The gradient-leakage audit on every node (the demo's default).")
    ] = True,
    min_nodes: Annotated[
        int, typer.Option(min=0, help="Nodes the run needs (0 = the nodes minus the losses "
                          "SecAgg+ tolerates); with fewer left the demo stops the run.")
    ] = 0,
    restart_lost_nodes: Annotated[
        bool, typer.Option("--restart-lost-nodes",
                           help="Start a SuperNode that exits again; it joins a later round.")
    ] = False,
    node_guard: Annotated[
        bool, typer.Option(help="Run the SuperNodes under the node operator's guard (the default).")
    ] = True,
) -> None:
    """Train the digits app on a real local Flower deployment and report the result.

    Starts one SuperLink and N SuperNodes on 127.0.0.1, submits the app with
    `flwr run`, shows live progress, writes a JSON summary and stops every process
    it started. Exits 1 if the run does not complete.
    """
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if robust_objective != "plain" and dp_sgd:
        console.print(f"[red]error:[/red] --robust-objective {robust_objective} cannot be combined "
                      "with DP-SGD (docs/robustness.md): add --no-dp-sgd")
        raise typer.Exit(2)
    # Only what the user changed: another app (--app) need not declare these keys.
    run_config: dict = {}
    if robust_objective != "plain":
        run_config[RunConfig.ROBUST_OBJECTIVE] = robust_objective
    if robust_eval_every:
        run_config[RunConfig.ROBUST_EVAL_EVERY] = robust_eval_every
    if not dp_sgd:
        run_config[RunConfig.DP_SGD] = False
    if not audit:
        run_config[RunConfig.AUDIT] = False
    options = DemoOptions(
        nodes=nodes,
        rounds=rounds,
        partition=partition.value,
        alpha=alpha,
        seed=seed,
        simulation=simulation,
        superlink_port=port,
        app_dir=app_dir,
        node_config={} if simulation else {"device": device},
        run_config=run_config,
        keep_workdir=keep_workdir,
        prometheus=prometheus,
        min_nodes=min_nodes or None,
        restart_lost_nodes=restart_lost_nodes,
        node_guard=node_guard,
        summary_path=summary,  # written also when interrupted
    )
    try:
        if console.is_terminal:
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                result = run_demo(options, lambda s: live.update(_progress_view(s, rounds)))
            console.print()
        else:
            result = run_demo(options, _PlainProgress(rounds))
    except PortInUseError as err:
        console.print(f"[red]error:[/red] {err}; choose another --port or 0 for a free one")
        raise typer.Exit(2) from err
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process of the demo was stopped[/yellow]; "
                      f"summary in {summary}")
        raise typer.Exit(130) from None
    result.write(summary)
    if result.success:
        console.print(
            f"[green]run {result.run_id} completed[/green]: final test accuracy "
            f"{_fmt(result.final_test_accuracy, '.3f')} after {result.num_rounds} rounds "
            f"in {result.elapsed_s:.0f} s; summary in {summary}"
        )
        eps = result.privacy.get(ReplyMetrics.DP_SGD_EPSILON)
        budget = result.privacy.get(RunConfig.DP_SGD_MAX_EPSILON)
        if eps is not None:
            console.print(
                f"record-level DP: epsilon {eps:.2f} of {_fmt(budget or None, '.1f')} at delta "
                f"{_fmt(result.privacy.get(RunConfig.DP_SGD_DELTA), 'g')}"
            )
        if result.audit:
            worst = result.audit
            console.print(
                f"leakage audit, worst round {worst['round']}: "
                f"{int(worst[ReplyMetrics.AUDIT_LEAKS])} of {int(worst[ReplyMetrics.AUDIT_RAN])} audits leak; "
                f"PSNR {worst[ReplyMetrics.AUDIT_PSNR_DB]:.1f} dB "
                f"({worst[ReplyMetrics.AUDIT_PSNR_GAIN_DB]:+.1f} dB vs the mean image), "
                f"label accuracy {worst[ReplyMetrics.AUDIT_LABEL_ACCURACY]:.2f}"
            )
        return
    console.print(f"[red]demo failed[/red]: {result.error or result.status}")
    if result.workdir:
        console.print(f"logs: {result.workdir}/logs; summary in {summary}")
    raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
