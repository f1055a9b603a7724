"""``flwr-guard audit-endpoints`` (registered in flwr_guard.cli): the endpoint inspection
of :mod:`flwr_guard.inspection.endpoints` from the command line (httpx is imported inside
the command, so ``flwr-guard --help`` stays fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

ServiceOpt = Annotated[list[str], typer.Option(
    "--service", help="Base URL of an HTTP service (SuperLink, SuperNode health port); repeatable."
)]
ExporterOpt = Annotated[list[str], typer.Option(
    "--exporter", help="URL of a Prometheus metrics exporter; repeatable."
)]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Per-request timeout in seconds.")]
SeriesOpt = Annotated[int, typer.Option(min=1, help="Most label sets a metric family may have.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the findings as JSON.")]


def audit_endpoints_command(
    service: ServiceOpt = [],  # noqa: B006 - typer's way to say "none given"
    exporter: ExporterOpt = [],  # noqa: B006
    timeout: TimeoutOpt = 3.0,
    max_series: SeriesOpt = 100,
    json_out: JsonOpt = None,
) -> None:
    """Check HTTP endpoints and metrics exporters for leaks and debug interfaces.

    Looks for debug / admin paths and plaintext HTTP on services, and for gradients,
    per-example data and high-cardinality series on Prometheus exporters. Exits 1 when
    anything is found, 2 on bad input.
    """
    from flwr_guard.inspection.endpoints import audit_endpoints

    if not service and not exporter:
        console.print("[red]error:[/red] give at least one --service or --exporter URL")
        raise typer.Exit(2)
    try:
        findings = audit_endpoints(service, exporter, timeout, max_series)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if json_out is not None:
        json_out.write_text(json.dumps([f.to_dict() for f in findings], indent=2) + "\n")
    if not findings:
        console.print(f"[green]no findings[/green] on {len(service)} service(s) and "
                      f"{len(exporter)} exporter(s)")
        return
    table = Table(title="endpoint audit findings")
    for column in ("url", "kind", "detail"):
        table.add_column(column)
    for finding in findings:
        table.add_row(finding.url, finding.kind, finding.detail)
    console.print(table)
    raise typer.Exit(1)
