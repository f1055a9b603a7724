"""``flwr-guard node ...``: start a guarded SuperNode, pin and sign apps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

node_app = typer.Typer(help="The node operator's guard: run any ClientApp under the node's policy.",
                       no_args_is_help=True)
_PASS = {"allow_extra_args": True, "ignore_unknown_options": True}


_ISOLATION_HELP = ("how each app's process is kept from the guard: sandbox (another user, no "
                   "network, own PID and mount namespaces; needs root or CAP_SETUID, CAP_SETGID, "
                   "CAP_SYS_ADMIN), user (another user, host network), process (the guard's own "
                   "user), auto (sandbox when the guard can, else process)")
_USER_HELP = "the app's user: USER, USER:GROUP, UID or UID:GID (default 65530:65530, an id no account uses)"


@node_app.command("start", context_settings=_PASS)
def start_command(
    ctx: typer.Context,
    app_isolation: Annotated[str, typer.Option(help=_ISOLATION_HELP)] = "auto",
    app_user: Annotated[str | None, typer.Option(help=_USER_HELP)] = None,
) -> None:
    """Start flower-supernode (its arguments follow) with the guard's SuperExec."""
    from flwr_guard.node.launch import start

    raise typer.Exit(start(list(ctx.args), app_isolation, app_user))


@node_app.command("superexec", context_settings=_PASS)
def superexec_command(
    ctx: typer.Context,
    app_isolation: Annotated[str, typer.Option(help=_ISOLATION_HELP)] = "auto",
    app_user: Annotated[str | None, typer.Option(help=_USER_HELP)] = None,
) -> None:
    """Flower's flower-superexec, launching the guard instead of flwr-clientapp."""
    from flwr_guard.node.superexec import main

    main([*ctx.args, "--app-isolation", app_isolation, *(["--app-user", app_user] if app_user else [])])


@node_app.command("fab-hash")
def fab_hash_command(app_dir: Annotated[Path, typer.Argument(help="the app's directory")]) -> None:
    """Print the hash of the FAB that `flwr run APP_DIR` builds (for guard-fab-hashes)."""
    from flwr.cli.build import build_fab_from_disk

    from flwr_guard.node.allowlist import fab_hash

    typer.echo(fab_hash(build_fab_from_disk(app_dir)))


@node_app.command("keygen")
def keygen_command(key: Annotated[Path, typer.Argument(help="new private key file")]) -> None:
    """Create a publisher's Ed25519 key; print its public key (for guard-fab-trusted-keys)."""
    from flwr_guard.node.fab_signature import write_private_key

    typer.echo(write_private_key(key))


@node_app.command("sign")
def sign_command(app_dir: Annotated[Path, typer.Argument(help="the app's directory")],
                 key: Annotated[Path, typer.Option(help="the publisher's private key file")]) -> None:
    """Sign the app: write flwr-guard-signature.json into APP_DIR (it travels in the FAB)."""
    from flwr_guard.node.fab_signature import load_private_key, sign_app_dir

    typer.echo(str(sign_app_dir(app_dir, load_private_key(key))))
