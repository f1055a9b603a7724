"""A node's long-term Ed25519 signing key on disk (the key a federation roster lists)."""

from __future__ import annotations

import os
from pathlib import Path

from flwr_guard.secagg import crypto


def write_signing_key(path: str | Path) -> bytes:
    """Create a fresh Ed25519 key, write its 32-byte private seed as 64 hex digits to
    ``path`` (mode 0600, refusing to overwrite) and return the raw public key.

    Raises:
        FileExistsError: ``path`` exists (a node's key must stay stable).
    """
    secret, public = crypto.ed25519_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret.hex() + "\n")
    return public


def load_signing_key(path: str | Path) -> bytes:
    """The raw 32-byte Ed25519 private seed stored by :func:`write_signing_key`.

    Raises:
        ValueError: unreadable, or not 64 hex digits.
    """
    try:
        text = Path(path).read_text().strip()
    except OSError as err:
        raise ValueError(f"cannot read the SecAgg+ signing key {path}: {err}") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise ValueError(f"SecAgg+ signing key {path} must hold 64 hex digits (an Ed25519 seed)")
    return secret
