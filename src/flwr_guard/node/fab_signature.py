"""Ed25519 signatures over a Flower App Bundle (FAB), carried inside the FAB.

Core (no Flower imports at module level). A publisher whom the node operator trusts
signs an app directory with ``flwr-guard node sign APP_DIR --key PUBLISHER.key``; the
signature travels *in* the FAB as the file :data:`SIGNATURE_FILE`, so that nothing
besides the FAB has to reach the node. What is signed is the FAB's content as Flower's
own manifest lists it: the ``.info/CONTENT`` file that ``flwr build`` / ``flwr run``
write (one ``path,sha256,size_bits`` line per file, Flower 1.41
``flwr.cli.build.build_fab_from_files``), minus the signature file's own line. The
verifier recomputes every listed file's SHA-256 from the archive and refuses an archive
with a file that the manifest does not list, so the signature covers every byte of code
the node would install.

Signed message: ``b"flwr-guard-fab-v1\\n" + "\\n".join(sorted(lines)).encode()``
(:func:`content_digest` hashes it with SHA-256 first). Ed25519 (RFC 8032) from the
``cryptography`` library.

Key files: the private key is the 32-byte Ed25519 seed as 64 hex digits (the same
format as SecAgg+'s signing keys, :mod:`flwr_guard.secagg.keys`); a public key is 64
hex digits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

#: The signature file inside the app directory / FAB (``**/*.json`` is in Flower's
#: default FAB include patterns).
SIGNATURE_FILE = "flwr-guard-signature.json"
CONTENT_FILE = ".info/CONTENT"
DOMAIN = b"flwr-guard-fab-v1\n"
#: A FAB is at most this large when we open it (Flower's own limit is 10 MB).
MAX_FAB_BYTES = 64 * 1024 * 1024


class FabSignatureError(ValueError):
    """A FAB whose signature or manifest does not verify (the message says why)."""


def content_lines(fab: bytes) -> list[str]:
    """The FAB's manifest lines, each checked against the archive, minus the signature's.

    Args:
        fab: the FAB's bytes (a zip archive).

    Returns:
        ``path,sha256,size_bits`` lines, sorted.

    Raises:
        FabSignatureError: not a zip, no ``.info/CONTENT``, a listed file missing or with
            another hash or size, or a file in the archive that the manifest omits.
    """
    if len(fab) > MAX_FAB_BYTES:
        raise FabSignatureError(f"the FAB is {len(fab)} bytes, over {MAX_FAB_BYTES}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        names = set(archive.namelist())
        if CONTENT_FILE not in names:
            raise FabSignatureError(f"the FAB has no {CONTENT_FILE} manifest")
        manifest = archive.read(CONTENT_FILE).decode("utf-8")
        lines, listed = [], set()
        for line in manifest.splitlines():
            path, digest, bits = line.rsplit(",", 2)
            data = archive.read(path)
            if hashlib.sha256(data).hexdigest() != digest or len(data) * 8 != int(bits):
                raise FabSignatureError(f"{path} in the FAB differs from its manifest line")
            listed.add(path)
            if path != SIGNATURE_FILE:
                lines.append(line)
    except FabSignatureError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError) as err:
        raise FabSignatureError(f"the FAB does not parse: {err}") from err
    unlisted = sorted(names - listed - {CONTENT_FILE})
    if unlisted:
        raise FabSignatureError(f"the FAB holds files its manifest does not list: {unlisted[:5]}")
    return sorted(lines)


def content_digest(fab: bytes) -> bytes:
    """SHA-256 of the signed message of ``fab`` (see the module docstring); 32 bytes.

    Raises:
        FabSignatureError: see :func:`content_lines`.
    """
    return hashlib.sha256(DOMAIN + "\n".join(content_lines(fab)).encode("utf-8")).digest()


def signature_record(fab: bytes) -> dict[str, str] | None:
    """The parsed :data:`SIGNATURE_FILE` of ``fab``, or ``None`` when it has none.

    Raises:
        FabSignatureError: a signature file that is not a JSON object of hex strings.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            if SIGNATURE_FILE not in archive.namelist():
                return None
            record = json.loads(archive.read(SIGNATURE_FILE).decode("utf-8"))
    except (zipfile.BadZipFile, ValueError, UnicodeDecodeError) as err:
        raise FabSignatureError(f"{SIGNATURE_FILE} does not parse: {err}") from err
    if not (isinstance(record, dict) and isinstance(record.get("public-key"), str)
            and isinstance(record.get("signature"), str)):
        raise FabSignatureError(f"{SIGNATURE_FILE} needs hex strings 'public-key' and 'signature'")
    return record


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a publisher's private key (64 hex digits).

    Raises:
        ValueError: the file does not hold 64 hex digits (its path is named).
    """
    text = Path(path).read_text(encoding="utf-8").strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ValueError(f"{path} must hold an Ed25519 private key as 64 hex digits")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key of ``key`` as 64 hex digits."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def write_private_key(path: str | os.PathLike[str]) -> str:
    """Create a new publisher key in ``path`` (mode 0600); return its public key (hex).

    Raises:
        FileExistsError: ``path`` exists (a key is never overwritten).
    """
    seed = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(seed.hex() + "\n")
    return public_key_hex(Ed25519PrivateKey.from_private_bytes(seed))


def sign_fab(fab: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature record for ``fab`` (its own signature file, if any, is ignored)."""
    return {"public-key": public_key_hex(key), "signature": key.sign(content_digest(fab)).hex()}


def sign_app_dir(app_dir: str | os.PathLike[str], key: Ed25519PrivateKey) -> Path:
    """Sign the FAB that ``flwr run APP_DIR`` builds; write :data:`SIGNATURE_FILE` there.

    The FAB is built with Flower's own ``build_fab_from_files`` (the files
    ``collect_files`` finds, without an old signature file), so the signed lines are the
    ones the node will see. Edit nothing in the app after signing.

    Returns:
        The path of the signature file written.
    """
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    root = Path(app_dir).expanduser().resolve()
    files = {k: v for k, v in collect_files(root).items() if k != SIGNATURE_FILE}
    fab, _ = build_fab_from_files(files)
    out = root / SIGNATURE_FILE
    out.write_text(json.dumps(sign_fab(fab, key), indent=2) + "\n", encoding="utf-8")
    return out


@dataclass(frozen=True)
class VerifiedSignature:
    """A FAB signature that verified: by the trusted key ``public_key`` (hex)."""

    public_key: str


def verify_fab(fab: bytes, trusted_keys: frozenset[str]) -> VerifiedSignature:
    """Check that ``fab`` carries a valid signature by one of ``trusted_keys``.

    Args:
        fab: the FAB's bytes.
        trusted_keys: public keys (64 lowercase hex digits) the node operator trusts.

    Raises:
        FabSignatureError: no signature, a key not trusted, a signature that does not
            verify, or a manifest that does not match the archive.
    """
    record = signature_record(fab)
    if record is None:
        raise FabSignatureError(f"the FAB carries no {SIGNATURE_FILE}")
    key_hex = record["public-key"].strip().lower()
    if key_hex not in trusted_keys:
        raise FabSignatureError(f"the FAB is signed by {key_hex[:16]}..., a key this node does not trust")
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        public.verify(bytes.fromhex(record["signature"]), content_digest(fab))
    except (InvalidSignature, ValueError) as err:
        if isinstance(err, FabSignatureError):
            raise
        raise FabSignatureError(
            f"the FAB's signature by {key_hex[:16]}... does not verify (the app changed after it was signed?)"
        ) from None
    return VerifiedSignature(key_hex)
