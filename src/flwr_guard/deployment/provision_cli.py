"""``flwr-guard provision``, ``provision-device`` and ``signing-key``: the CLI of
:mod:`flwr_guard.deployment.provision`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flwr_guard.deployment.provision import (
    DEFAULT_HOSTS,
    ProvisionError,
    add_device,
    copy_public_key,
    provision,
)
from flwr_guard.secagg.keys import write_signing_key


def provision_command(
    out: Annotated[Path, typer.Option("--out", help="folder to write (created; must not hold a federation)")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="number of SuperNodes")] = 3,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="extra SuperLink name or IP for its certificate (repeatable)"),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="validity of the TLS certificates")] = 365,
) -> None:
    """Create a federation's credentials: TLS CA and SuperLink certificate, each SuperNode's
    authentication key and SecAgg+ signing key, and the administrator-signed roster."""
    try:
        federation = provision(out, nodes, (*DEFAULT_HOSTS, *(host or [])), days)
    except (ProvisionError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"provisioned {nodes} SuperNodes in {federation.out}")
    typer.echo(f"roster administrator key (node config secagg-roster-admin-key): "
               f"{federation.admin_public_key.hex()}")
    typer.echo(f"keep {federation.out / 'admin'} offline: it signs the roster and the certificates")


def provision_device_command(
    out: Annotated[Path, typer.Option("--out", help="the folder `flwr-guard provision` wrote")],
    name: Annotated[str, typer.Option("--name", help="the device's name in the roster (unique)")],
    signing_key: Annotated[
        str, typer.Option("--signing-key", help="the device's SecAgg+ public key, 64 hex digits")
    ],
    auth_public_key: Annotated[
        Path | None,
        typer.Option(
            "--auth-public-key",
            help="the device's SuperNode public key (OpenSSH ECDSA), copied to OUT/NAME.pub",
        ),
    ] = None,
) -> None:
    """Add a device that created its own keys to a provisioned federation: its SecAgg+
    public key joins the roster, which is signed again."""
    try:
        raw = bytes.fromhex(signing_key.strip())
    except ValueError:
        typer.echo("error: --signing-key must be 64 hex digits", err=True)
        raise typer.Exit(1) from None
    try:
        pub = copy_public_key(out, name, auth_public_key) if auth_public_key else None
        federation = add_device(out, name, raw)
    except ProvisionError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} added: the roster lists {federation.nodes} members; give every node the new "
               f"{federation.roster}")
    if pub is not None:
        typer.echo(f"register it at the SuperLink: flwr supernode register {pub} CONNECTION")


def signing_key_command(
    path: Annotated[Path, typer.Argument(help="file to create (mode 0600; never overwritten)")],
) -> None:
    """Create this node's SecAgg+ signing key and print its public key (64 hex digits)."""
    try:
        public = write_signing_key(path)
    except FileExistsError:
        typer.echo(f"error: {path} exists; a node's key must stay stable", err=True)
        raise typer.Exit(1) from None
    typer.echo(public.hex())
