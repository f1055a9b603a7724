"""``flwr-guard node start``: a SuperNode and the guard's SuperExec, started together.

Starts ``flower-supernode ARGS --isolation process --superexec-auth-secret-file F`` and
``python -m flwr_guard.node.superexec`` against the SuperNode's Runtime API with the same
secret (a fresh random secret in a 0600 file: only a SuperExec that holds it may acquire
the node's tasks, so a plain ``flower-superexec`` cannot take a task past the guard).
Stops both when either exits or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_RUNTIME_PORT = 9094  # flwr.supercore.constant.SUPERNODE_UVICORN_DEFAULT_PORT


def _option(args: Sequence[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def write_secret(directory: str | os.PathLike[str]) -> Path:
    """A new 32-byte SuperExec auth secret in ``directory`` (mode 0600)."""
    path = Path(directory) / "superexec-auth-secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode())
    return path


def guarded_commands(supernode_args: Sequence[str], secret: str | os.PathLike[str],
                     isolation_args: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The argv of the SuperNode and of the guard's SuperExec for ``supernode_args``
    (``isolation_args``: ``--app-isolation``/``--app-user`` for the SuperExec).

    Raises:
        ValueError: ``supernode_args`` already choose an isolation mode.
    """
    if any(a == "--isolation" or a.startswith("--isolation=") for a in supernode_args):
        raise ValueError("the node guard sets --isolation process itself: drop --isolation")
    host = _option(supernode_args, "--host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    port = _option(supernode_args, "--port", str(DEFAULT_RUNTIME_PORT))
    supernode = ["flower-supernode", *supernode_args, "--isolation", "process",
                 "--superexec-auth-secret-file", str(secret)]
    superexec = [sys.executable, "-m", "flwr_guard.node.superexec", "--insecure",
                 "--runtime-api-address", f"{host}:{port}",
                 "--superexec-auth-secret-file", str(secret), *isolation_args]
    return supernode, superexec


def start(supernode_args: Sequence[str], app_isolation: str = "auto", app_user: str | None = None) -> int:
    """Run both processes until one exits; return the SuperNode's exit code (the
    SuperExec's when it failed first, e.g. 2 for an app isolation that cannot be had).

    ``app_isolation``/``app_user``: :mod:`flwr_guard.node.isolation` (checked here
    before anything starts, then resolved and logged by the SuperExec).
    """
    from flwr_guard.node.isolation import AppIsolation, IsolationError

    try:
        AppIsolation.resolve(app_isolation, app_user)
    except IsolationError as err:
        sys.stderr.write(f"flwr-guard node start: {err}\n")
        return 2
    isolation_args = ["--app-isolation", app_isolation, *(["--app-user", app_user] if app_user else [])]
    with tempfile.TemporaryDirectory(prefix="flwr-guard-node-") as tmp:
        supernode_argv, superexec_argv = guarded_commands(supernode_args, write_secret(tmp), isolation_args)
        supernode = subprocess.Popen(supernode_argv)
        superexec = subprocess.Popen([*superexec_argv, "--parent-pid", str(supernode.pid)])
        stop = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.append(True))
        try:
            while not stop and supernode.poll() is None and superexec.poll() is None:
                time.sleep(0.5)
        finally:
            for proc in (superexec, supernode):
                if proc.poll() is None:
                    proc.terminate()
            for proc in (superexec, supernode):
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if not stop and superexec.returncode and supernode.returncode in (None, -signal.SIGTERM):
            return superexec.returncode  # the guard failed first (e.g. its start-up check)
        return supernode.returncode or 0
