"""Admit SuperNodes to a SuperLink with SuperNode authentication on.

Runs Flower's own ``flwr supernode register PUBLIC_KEY CONNECTION --format json`` and
reads its JSON reply. The local launcher calls :func:`register_supernode`; the compose
and Kubernetes registration steps run ``python -m flwr_guard.deployment.register
--connection NAME KEY.pub ...``, which also accepts keys that are already registered,
so that a registration step can run again (``docker compose up`` twice, a Job retried)
without failing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from flwr_guard.errors import FlwrGuardError

ALREADY_REGISTERED = "Public key already in use"


class RegistrationError(FlwrGuardError, RuntimeError):
    """The SuperLink refused a SuperNode's public key."""


def register_command(public_key: str | Path, connection: str) -> list[str]:
    """The ``flwr supernode register`` argv for one public key (OpenSSH EC format)."""
    return ["flwr", "supernode", "register", str(public_key), connection, "--format", "json"]


def register_supernode(
    public_key: str | Path,
    connection: str,
    env: Mapping[str, str] | None = None,
    accept_existing: bool = False,
    timeout: float = 120.0,
) -> str | None:
    """Register one SuperNode public key; return its node id.

    Args:
        public_key: path of the SuperNode's OpenSSH EC public key (a NIST curve).
        connection: name of the SuperLink connection in ``$FLWR_HOME/config.toml``.
        env: environment of the ``flwr`` process (``None``: this process's).
        accept_existing: return ``None`` instead of raising when the key is already
            registered.
        timeout: seconds before ``flwr`` is given up on.

    Raises:
        RegistrationError: with Flower's message if the key is refused, or if ``flwr``
            does not answer within ``timeout``.
    """
    try:
        done = subprocess.run(
            register_command(public_key, connection),
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise RegistrationError(f"flwr supernode register {public_key}: no answer") from err
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if done.returncode == 0 and reply.get("success"):
        return str(reply["node-id"])
    message = str(reply.get("error-message") or done.stdout.strip() or done.stderr.strip())
    if accept_existing and ALREADY_REGISTERED in message:
        return None
    raise RegistrationError(
        f"registering SuperNode key {public_key} failed (exit {done.returncode}): {message}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flwr_guard.deployment.register``."""
    parser = argparse.ArgumentParser(
        prog="python -m flwr_guard.deployment.register",
        description="Register SuperNode public keys with `flwr supernode register`; "
        "keys already registered count as success.",
    )
    parser.add_argument("--connection", required=True, help="connection in $FLWR_HOME")
    parser.add_argument("public_keys", nargs="+", type=Path, help="OpenSSH EC public keys")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key in args.public_keys:
        try:
            node_id = register_supernode(key, args.connection, accept_existing=True)
        except RegistrationError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{key}: " + (f"registered as node {node_id}" if node_id else "already registered"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
