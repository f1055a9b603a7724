"""`flwr-guard provision`: one command writes every credential of a federation, and
what it writes verifies (keys against the roster, the roster's signature, the TLS chain).
"""

from __future__ import annotations

import json
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from flwr_guard.cli import app
from flwr_guard.deployment.provision import (
    ProvisionError,
    add_device,
    copy_public_key,
    load_federation,
    provision,
)
from flwr_guard.secagg import crypto
from flwr_guard.secagg.keys import load_signing_key, write_signing_key
from flwr_guard.secagg.policy import load_roster, policy_from_node_config

runner = CliRunner()


def _public(secret: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "credentials"
    done = runner.invoke(app, ["provision", "--nodes", "3", "--out", str(out), "--host", "fl.example.com"])
    assert done.exit_code == 0, done.output
    return load_federation(out)


def test_every_nodes_signing_key_is_in_the_signed_roster(federation) -> None:
    out = federation.out
    admin = bytes.fromhex((out / "roster-admin.pub").read_text().strip())
    roster = load_roster(out / "roster.json", admin)
    keys = [_public(load_signing_key(out / f"secagg-{i}.key")) for i in range(3)]
    assert sorted(m.signing_key for m in roster.members) == sorted(keys)
    assert {m.name for m in roster.members} == {"supernode-0", "supernode-1", "supernode-2"}
    # the administrator's secret is the key the roster is signed with
    assert _public(load_signing_key(out / "admin/roster-admin.key")) == admin
    # each node's policy loads from exactly the node config the deployment gives it
    for i in range(3):
        policy = policy_from_node_config(federation.node_config(i))
        assert policy.roster is not None and policy.roster.member(keys[i]) is not None


def test_a_roster_altered_or_signed_by_another_key_is_refused(federation, tmp_path) -> None:
    data = json.loads((federation.out / "roster.json").read_text())
    data["members"][0]["name"] = "mallory"
    altered = tmp_path / "roster.json"
    altered.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="the administrator signature does not verify"):
        load_roster(altered, federation.admin_public_key)
    _, other = crypto.ed25519_keypair()
    with pytest.raises(ValueError, match="the administrator signature does not verify"):
        load_roster(federation.out / "roster.json", other)


def test_tls_chain_verifies_for_the_superlinks_names(federation) -> None:
    out = federation.out
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    for name in ("superlink", "localhost", "fl.example.com"):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(name))
        chain = verifier.verify(server, [])
        assert chain[-1] == ca
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("evil.example"))
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(server, [])


def test_supernode_auth_keys_are_p384_openssh_pairs(federation) -> None:
    for i in range(3):
        private = serialization.load_ssh_private_key(federation.auth_key(i).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key((federation.out / f"supernode-{i}.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()


def test_offline_secrets_are_private_and_mounted_files_readable(federation) -> None:
    out = federation.out
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "admin").stat().st_mode) == 0o700
    for name in ("admin/ca.key", "admin/roster-admin.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert not (out / "ca.key").exists()
    # what containers mount: readable by the images' uid 10001 through a bind mount ...
    for name in ("server.key", "supernode-0.pub", "roster.json", "ca.crt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    # ... but a node's private keys only by their owner: the node's guard reads them as
    # root; the ClientApp, run as another uid, cannot
    for name in ("supernode-0", "secagg-0.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name


def test_a_provisioned_folder_is_never_overwritten(federation) -> None:
    before = (federation.out / "roster.json").read_bytes()
    done = runner.invoke(app, ["provision", "--nodes", "2", "--out", str(federation.out)])
    assert done.exit_code == 1
    assert "already holds a federation" in done.output
    assert (federation.out / "roster.json").read_bytes() == before
    with pytest.raises(ProvisionError, match="--nodes must be at least 1"):
        provision(federation.out.parent / "none", 0)


def test_a_device_with_its_own_key_joins_and_every_node_accepts_the_new_roster(tmp_path) -> None:
    fed = provision(tmp_path / "credentials", 2)
    # on the device: its own SecAgg+ key (the secret never leaves it) and auth key pair
    done = runner.invoke(app, ["signing-key", str(tmp_path / "device.key")])
    assert done.exit_code == 0, done.output
    device_public = bytes.fromhex(done.output.strip())
    assert device_public == _public(load_signing_key(tmp_path / "device.key"))
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "device.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    # at the administrator
    done = runner.invoke(app, [
        "provision-device", "--out", str(fed.out), "--name", "lab-laptop",
        "--signing-key", device_public.hex(), "--auth-public-key", str(tmp_path / "device.pub"),
    ])
    assert done.exit_code == 0, done.output
    assert "the roster lists 3 members" in done.output
    assert (fed.out / "lab-laptop.pub").read_bytes() == (tmp_path / "device.pub").read_bytes()
    roster = load_roster(fed.out / "roster.json", fed.admin_public_key)
    assert roster.member(device_public).name == "lab-laptop"
    for i in range(2):  # the existing nodes keep their keys and accept the new roster
        assert roster.member(_public(load_signing_key(fed.signing_key(i)))) is not None
    # the same name or key twice, a bad key, a missing admin key: refused, roster intact
    before = (fed.out / "roster.json").read_bytes()
    with pytest.raises(ProvisionError, match="a member named 'lab-laptop' already"):
        add_device(fed.out, "lab-laptop", crypto.ed25519_keypair()[1])
    with pytest.raises(ProvisionError, match="the roster lists a signing key twice"):
        add_device(fed.out, "again", device_public)
    done = runner.invoke(app, ["provision-device", "--out", str(fed.out), "--name", "x", "--signing-key", "zz"])
    assert done.exit_code == 1 and "64 hex digits" in done.output
    with pytest.raises(ProvisionError, match="not an OpenSSH ECDSA public key"):
        copy_public_key(fed.out, "y", fed.out / "ca.crt")
    (fed.out / "admin" / "roster-admin.key").unlink()
    with pytest.raises(ProvisionError, match="roster-admin.key is missing"):
        add_device(fed.out, "other", crypto.ed25519_keypair()[1])
    assert (fed.out / "roster.json").read_bytes() == before


def test_signing_key_command_never_overwrites(tmp_path) -> None:
    write_signing_key(tmp_path / "k")
    before = (tmp_path / "k").read_bytes()
    done = runner.invoke(app, ["signing-key", str(tmp_path / "k")])
    assert done.exit_code == 1 and "must stay stable" in done.output
    assert (tmp_path / "k").read_bytes() == before

