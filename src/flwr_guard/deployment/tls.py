"""TLS certificates and SuperNode keys for a deployment, made with ``cryptography``.

What :func:`make_credentials` writes is what ``deploy/compose/certs/generate.sh``
writes with openssl and ssh-keygen (same names, same choices), so the local launcher
and the containers use interchangeable material:

- ``ca.crt`` / ``ca.key``: a self-signed CA (ECDSA P-256, SHA-256, ``CA:TRUE,
  pathlen:0``, key usage ``keyCertSign, cRLSign``);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, key
  usage ``digitalSignature``, extended key usage ``serverAuth``, one SAN per host
  (IP addresses as ``IP``, names as ``DNS``), RFC 5280 section 4.2.1.6;
- ``supernode-<i>`` / ``supernode-<i>.pub``: each SuperNode's ECDSA P-384 key pair in
  OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes and what Flower's
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read).

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flwr_guard.deployment.topology import TlsConfig

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(
    digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """An X.509 key usage with only the given bits set (RFC 5280 section 4.2.1.3)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hosts``: ``IPAddress`` for IPv4/IPv6 literals, else ``DNSName``.

    Raises:
        ValueError: if ``hosts`` is empty or holds an empty name.
    """
    if not hosts or not all(host.strip() for host in hosts):
        raise ValueError(f"a server certificate needs at least one non-empty host, got {hosts!r}")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca_and_server_cert(
    out_dir: Path, hosts: Sequence[str] = LOCAL_HOSTS, days: int = 365
) -> TlsConfig:
    """Write a CA and a SuperLink certificate for ``hosts`` into ``out_dir``.

    Args:
        out_dir: folder for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``.
        hosts: every address clients dial (DNS names and IP literals); the first one
            is also the certificate's common name.
        days: validity of both certificates, >= 1.

    Returns:
        The absolute paths as a :class:`TlsConfig`.

    Raises:
        ValueError: for no hosts or ``days < 1``.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    sans = subject_alt_names(hosts)
    out_dir = Path(out_dir).resolve()
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-guard deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip())]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    tls = TlsConfig(
        ca_certfile=str(out_dir / "ca.crt"),
        certfile=str(out_dir / "server.crt"),
        keyfile=str(out_dir / "server.key"),
    )
    _write(Path(tls.ca_certfile), ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out_dir / "ca.key", _pem_key(ca_key), private=True)
    _write(Path(tls.certfile), server_cert.public_bytes(serialization.Encoding.PEM))
    _write(Path(tls.keyfile), _pem_key(server_key), private=True)
    return tls


def make_supernode_keys(out_dir: Path, nodes: int) -> tuple[str, ...]:
    """Write ``nodes`` SuperNode key pairs (ECDSA P-384, OpenSSH format) into ``out_dir``.

    Returns:
        The absolute private key paths ``out_dir/supernode-<i>``; each public key is
        the same path plus ``.pub``.

    Raises:
        ValueError: if ``nodes < 1``.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    out_dir = Path(out_dir).resolve()
    paths = []
    for index in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = out_dir / f"supernode-{index}"
        _write(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            private=True,
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(Path(f"{path}.pub"), public + f" supernode-{index}\n".encode())
        paths.append(str(path))
    return tuple(paths)


def make_credentials(
    out_dir: Path, nodes: int, hosts: Sequence[str] = LOCAL_HOSTS, days: int = 365
) -> tuple[TlsConfig, tuple[str, ...]]:
    """TLS material for the SuperLink and key pairs for ``nodes`` SuperNodes.

    Returns:
        ``(tls, private_key_paths)``, ready for :class:`Topology`'s ``tls`` and
        ``supernode_auth_keys``.
    """
    out_dir = Path(out_dir)
    return make_ca_and_server_cert(out_dir, hosts, days), make_supernode_keys(out_dir, nodes)
