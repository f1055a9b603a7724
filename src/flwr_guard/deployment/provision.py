"""Provision a federation in one step: every credential a TLS + SecAgg+ deployment needs.

For ``N`` SuperNodes, :func:`provision` writes into one folder (the layout that
``deploy/compose`` mounts and that the Helm chart's Secrets are made from)::

    ca.crt                    TLS CA certificate: every SuperNode and the flwr CLI
    server.crt, server.key    the SuperLink's TLS certificate (SANs: ``hosts``) and key
    supernode-<i>             SuperNode i's authentication key (ECDSA P-384, OpenSSH)
    supernode-<i>.pub         ... its public key, registered at the SuperLink
    secagg-<i>.key            SuperNode i's SecAgg+ signing key (Ed25519 seed, 64 hex)
    roster.json               the federation roster: every node's SecAgg+ public key,
                              signed by the roster administrator
    roster-admin.pub          the administrator's Ed25519 public key (64 hex): node
                              config ``secagg-roster-admin-key``
    admin/ca.key              the CA's private key            } offline secrets, never
    admin/roster-admin.key    the roster administrator's key  } mounted into a container

The folder and ``admin/`` are 0700; ``admin/*`` is 0600; the files containers mount are
0644 so that the images' non-root user (uid 10001) can read them through a bind mount
(the 0700 folder keeps them private on the host), as ``certs/generate.sh`` did.

A device that joins later creates its own SecAgg+ key (:func:`flwr_guard.secagg.keys.
write_signing_key`, ``flwr-guard signing-key PATH``) and hands over only the public key;
:func:`add_device` adds it to the roster and signs the roster again with the kept
administrator key. Every node then needs the new ``roster.json``.

Built on :mod:`flwr_guard.deployment.tls` (TLS and SuperNode keys),
:mod:`flwr_guard.secagg.keys` (signing keys) and :class:`flwr_guard.secagg.policy.Roster`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr_guard.deployment.tls import LOCAL_HOSTS, make_ca_and_server_cert, make_supernode_keys
from flwr_guard.keys import NodeConfig
from flwr_guard.secagg.keys import load_signing_key, write_signing_key
from flwr_guard.secagg.policy import Roster, RosterMember, load_roster

ROSTER = "roster.json"
ROSTER_ADMIN_PUB = "roster-admin.pub"
ADMIN_DIR = "admin"
ROSTER_ADMIN_KEY = f"{ADMIN_DIR}/roster-admin.key"
CA_KEY = f"{ADMIN_DIR}/ca.key"
# The SuperLink's DNS name on the compose network and in the Helm chart, then loopback.
DEFAULT_HOSTS = ("superlink", *LOCAL_HOSTS)


class ProvisionError(ValueError):
    """The folder cannot be provisioned (exists, lacks the admin key, bad input)."""


def signing_key_name(index: int) -> str:
    return f"secagg-{index}.key"


def auth_key_name(index: int) -> str:
    return f"supernode-{index}"


@dataclass(frozen=True)
class Federation:
    """What :func:`provision` wrote (absolute paths)."""

    out: Path
    nodes: int
    admin_public_key: bytes

    @property
    def roster(self) -> Path:
        return self.out / ROSTER

    def signing_key(self, index: int) -> Path:
        return self.out / signing_key_name(index)

    def auth_key(self, index: int) -> Path:
        return self.out / auth_key_name(index)

    def node_config(self, index: int, directory: str | Path | None = None) -> dict[str, str]:
        """SuperNode ``index``'s SecAgg+ node config, with the files in ``directory``
        (default: this folder; e.g. the path a container mounts it at)."""
        base = Path(directory) if directory is not None else self.out
        return {
            NodeConfig.SECAGG_SIGNING_KEY: str(base / signing_key_name(index)),
            NodeConfig.SECAGG_ROSTER: str(base / ROSTER),
            NodeConfig.SECAGG_ROSTER_ADMIN_KEY: self.admin_public_key.hex(),
        }


def _readable(path: Path) -> None:
    os.chmod(path, 0o644)


def provision(
    out: str | Path, nodes: int, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365
) -> Federation:
    """Write the credentials of a federation of ``nodes`` SuperNodes into ``out``.

    Args:
        out: the folder (created, 0700); it must not hold a roster already.
        nodes: number of SuperNodes (>= 1).
        hosts: names and IP addresses clients dial the SuperLink at (certificate SANs).
        days: validity of the TLS certificates.

    Raises:
        ProvisionError: ``nodes < 1``, no host, or ``out`` already provisioned.
    """
    if nodes < 1:
        raise ProvisionError(f"--nodes must be at least 1, got {nodes}")
    if not hosts:
        raise ProvisionError("at least one SuperLink host name is needed for its certificate")
    out = Path(out).resolve()
    if (out / ROSTER).exists() or (out / "ca.crt").exists():
        raise ProvisionError(
            f"{out} already holds a federation; use `flwr-guard provision-device` to add a "
            "node, or choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    (out / ADMIN_DIR).mkdir(mode=0o700, exist_ok=True)
    os.chmod(out / ADMIN_DIR, 0o700)

    tls = make_ca_and_server_cert(out, list(hosts), days)
    os.replace(out / "ca.key", out / CA_KEY)
    _readable(Path(tls.keyfile))  # the SuperLink container's uid 10001 reads it
    # A node's private keys stay 0600: its guard reads them as root (compose, Helm) and
    # the ClientApp, run as another uid, must not (docs/deploy.md, "The node guard").
    make_supernode_keys(out, nodes)

    members = []
    for index in range(nodes):
        path = out / signing_key_name(index)
        members.append(RosterMember(write_signing_key(path), auth_key_name(index)))
    admin_public = write_signing_key(out / ROSTER_ADMIN_KEY)
    Roster(tuple(members)).to_file(out / ROSTER, load_signing_key(out / ROSTER_ADMIN_KEY))
    (out / ROSTER_ADMIN_PUB).write_text(admin_public.hex() + "\n")
    load_roster(out / ROSTER, admin_public)  # what every node will check
    return Federation(out, nodes, admin_public)


def load_federation(out: str | Path) -> Federation:
    """The federation provisioned in ``out``, its roster checked against its admin key.

    Raises:
        ProvisionError: no roster or admin public key there, or the roster does not verify.
    """
    out = Path(out).resolve()
    try:
        admin_public = bytes.fromhex((out / ROSTER_ADMIN_PUB).read_text().strip())
        roster = load_roster(out / ROSTER, admin_public)
    except (OSError, ValueError) as err:
        raise ProvisionError(f"{out} is not a provisioned federation: {err}") from None
    return Federation(out, len(roster.members), admin_public)


def add_device(out: str | Path, name: str, signing_public_key: bytes) -> Federation:
    """Add a device's SecAgg+ public key to the federation in ``out`` and sign the
    roster again with the administrator key in ``out/admin``.

    Args:
        name: the member's name in the roster (for logs), unique.
        signing_public_key: the device's raw 32-byte Ed25519 public key.

    Raises:
        ProvisionError: not a provisioned folder, no administrator key, a bad key, or a
            name or key the roster lists already.
    """
    federation = load_federation(out)
    admin_key_path = federation.out / ROSTER_ADMIN_KEY
    if not admin_key_path.exists():
        raise ProvisionError(
            f"{admin_key_path} is missing: the roster can only be signed again with the "
            "administrator key it was signed with"
        )
    admin_secret = load_signing_key(admin_key_path)
    roster = load_roster(federation.roster, federation.admin_public_key)
    if any(m.name == name for m in roster.members):
        raise ProvisionError(f"the roster has a member named {name!r} already")
    try:
        member = RosterMember(signing_public_key, name)
        updated = Roster((*roster.members, member))
    except ValueError as err:
        raise ProvisionError(str(err)) from None
    tmp = federation.roster.with_suffix(".json.new")
    updated.to_file(tmp, admin_secret)
    os.replace(tmp, federation.roster)
    return Federation(federation.out, len(updated.members), federation.admin_public_key)


def copy_public_key(out: str | Path, name: str, public_key: str | Path) -> Path:
    """Copy a device's SuperNode authentication public key into ``out`` as ``NAME.pub``
    (what ``flwr supernode register`` takes); return the copy.

    Raises:
        ProvisionError: the file is missing or is not an OpenSSH ECDSA public key.
    """
    source = Path(public_key)
    try:
        text = source.read_text()
    except OSError as err:
        raise ProvisionError(f"cannot read {source}: {err}") from None
    if not text.startswith("ecdsa-sha2-nistp"):
        raise ProvisionError(f"{source} is not an OpenSSH ECDSA public key (Flower needs a NIST curve)")
    target = Path(out).resolve() / f"{name}.pub"
    if target.exists():
        raise ProvisionError(f"{target} exists already")
    shutil.copyfile(source, target)
    return target
