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


def write_federation(
    directory: str | Path, nodes: int, admin: bool = True, min_cohort: int | None = None,
    round_ledgers: bool = True,
) -> list[dict[str, str | int | float]]:
    """Set up a federation of ``nodes`` SuperNodes for SecAgg+: one signing-key file per
    node, the roster of their public keys (``roster.json``), signed by a fresh
    administrator key when ``admin`` (its private key is not kept).

    Args:
        min_cohort: when given, the smallest sum the operator of a small federation
            (one operator: every node its own) accepts: written as each node's
            ``secagg-min-cohort``, with ``secagg-max-colluders`` 0 and
            ``secagg-min-honest-others`` ``min_cohort - 1`` (the roster-derived default,
            C = ceil(0.05 x nodes) >= 1 with 2 honest others, needs sums of C + 3).
        round_ledgers: give each node its own SecAgg+ round ledger
            (``secagg-round-ledger``, :mod:`flwr_guard.secagg.round_ledger`), the absolute
            path ``<directory>/supernode-<i>.rounds.json``, outside the nodes' saved state.

    Returns:
        each node's SecAgg+ node config: ``secagg-signing-key``, ``secagg-roster``,
        (when ``round_ledgers``) ``secagg-round-ledger``, (when signed)
        ``secagg-roster-admin-key`` and (when ``min_cohort`` is given) ``secagg-min-cohort``,
        ``secagg-max-colluders``, ``secagg-min-honest-others``.

    Raises:
        FileExistsError: a key file exists already in ``directory``.
    """
    from flwr_guard.secagg.policy import (
        NODE_MAX_COLLUDERS,
        NODE_MIN_COHORT,
        NODE_MIN_HONEST_OTHERS,
        NODE_ROSTER,
        NODE_ROSTER_ADMIN_KEY,
        NODE_ROUND_LEDGER,
        NODE_SIGNING_KEY,
        Roster,
        RosterMember,
    )

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    members, paths = [], []
    for index in range(nodes):
        path = directory / f"supernode-{index}.key"
        members.append(RosterMember(write_signing_key(path), f"supernode-{index}"))
        paths.append(path)
    roster_path = directory / "roster.json"
    admin_secret, admin_public = crypto.ed25519_keypair() if admin else (None, None)
    Roster(tuple(members)).to_file(roster_path, admin_secret)
    common: dict[str, str | int] = {NODE_ROSTER: str(roster_path)}
    if admin_public is not None:
        common[NODE_ROSTER_ADMIN_KEY] = admin_public.hex()
    if min_cohort is not None:
        common[NODE_MIN_COHORT] = int(min_cohort)
        common[NODE_MAX_COLLUDERS] = 0
        common[NODE_MIN_HONEST_OTHERS] = max(1, int(min_cohort) - 1)
    return [{NODE_SIGNING_KEY: str(path), **common,
             **({NODE_ROUND_LEDGER: str(directory / f"supernode-{i}.rounds.json")} if round_ledgers else {})}
            for i, path in enumerate(paths)]
