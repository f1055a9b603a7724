"""Cryptographic primitives of SecAgg+, from ``cryptography`` (OpenSSL), pycryptodome, hashlib.

From ``cryptography`` (the hot paths: every client runs them O(k) times per round):

- X25519 key agreement (``hazmat.primitives.asymmetric.x25519``, RFC 7748) with
  HKDF-SHA256 (``hazmat.primitives.kdf.hkdf``, RFC 5869) as the key-derivation function;
- Ed25519 signatures (``hazmat.primitives.asymmetric.ed25519``, RFC 8032);
- AES-256-GCM (``hazmat.primitives.ciphers.aead.AESGCM``) to encrypt secret shares
  between clients.

From pycryptodome: Shamir secret sharing over GF(2^128)
(``Crypto.Protocol.SecretSharing.Shamir``), applied to the two 16-byte halves of a raw
32-byte secret (``cryptography`` has no secret sharing).

From the standard library: SHA-256 for transcripts (``hashlib``, OpenSSL), which also
hash the global model each round (:func:`flwr_guard.secagg.arrays.model_hash`): 4 MB
in 11.9 ms against 25.2 ms with pycryptodome's ``Crypto.Hash.SHA256``.

Why not pycryptodome for everything: it implements the curve arithmetic of X25519 and Ed25519
in its own C code and HKDF and GCM's set-up in Python; ``cryptography`` calls OpenSSL.
Measured on the 2-core benchmark machine (``time.process_time``, one operation,
pycryptodome 3.24.1 / cryptography 50.0.2): X25519 agreement + HKDF 4.3 / 0.21 ms
(HKDF alone 0.14 / 0.009 ms), Ed25519 sign 3.7 / 0.10-0.15 ms, verify 7.5 /
0.25-0.31 ms, AES-256-GCM encryption of one 66-byte share 0.16 / 0.006 ms. Flower
itself requires ``cryptography`` (>= 50, < 51 for Flower 1.41). Keys, signatures and
ciphertexts are the standard raw encodings, identical whichever library made them.

Nothing here is a hand-made primitive: the functions only fix encodings and labels.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Sequence

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flwr_guard.errors import FlwrGuardError

SECRET_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PROTOCOL_LABEL = b"flwr-guard/secagg+/v1"


class CryptoError(FlwrGuardError, ValueError):
    """A signature, ciphertext, key or share did not verify or parse."""


def transcript(*parts: bytes) -> bytes:
    """SHA-256 of length-prefixed ``parts`` (unambiguous: no two lists collide)."""
    digest = hashlib.sha256(PROTOCOL_LABEL)
    for part in parts:
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    return digest.digest()


def random_secret() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return os.urandom(SECRET_BYTES)


# -- X25519 + HKDF ---------------------------------------------------------------
def x25519_keypair() -> tuple[bytes, bytes]:
    """Return ``(private_key, public_key)``, both 32 raw bytes (RFC 7748 encoding)."""
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def x25519_public(private_seed: bytes) -> bytes:
    """The raw public key of a raw 32-byte X25519 private key.

    Raises:
        CryptoError: if ``private_seed`` is not 32 bytes.
    """
    try:
        return X25519PrivateKey.from_private_bytes(private_seed).public_key().public_bytes_raw()
    except (ValueError, TypeError) as err:
        raise CryptoError(f"invalid X25519 private key: {err}") from err


def agree(private_seed: bytes, peer_public: bytes, salt: bytes, info: bytes) -> bytes:
    """X25519 shared secret of two parties, through HKDF-SHA256 -> 32 bytes.

    Both parties get the same output; ``salt`` binds it to the round (the transcript
    digest), ``info`` to the purpose (mask seed or encryption key).

    Raises:
        CryptoError: if ``peer_public`` is not a valid X25519 public key (wrong length,
            or a low-order point that makes the shared secret all zero).
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private_seed).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except (ValueError, TypeError) as err:
        raise CryptoError(f"invalid X25519 public key: {err}") from err
    return HKDF(hashes.SHA256(), SECRET_BYTES, salt, info).derive(shared)


def valid_x25519_public(public: bytes) -> bool:
    """Whether ``public`` is an X25519 public key an exchange accepts (32 bytes, not a
    low-order point giving an all-zero secret): tried against a throwaway key."""
    try:
        agree(x25519_keypair()[0], public, b"", b"key-check")
    except CryptoError:
        return False
    return True


def derive(key: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869, ``cryptography``) of a 32-byte key -> 32 bytes; ``salt``
    binds the output to a context (a round digest), ``info`` to its purpose."""
    if len(key) != SECRET_BYTES:
        raise ValueError(f"key must be {SECRET_BYTES} bytes, got {len(key)}")
    return HKDF(hashes.SHA256(), SECRET_BYTES, salt, info).derive(key)


# -- AES-GCM ---------------------------------------------------------------------
def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12) || ciphertext || tag (16)`` with a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises:
        CryptoError: if the blob is too short or does not authenticate.
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError) as err:
        raise CryptoError("ciphertext does not authenticate") from err


# -- Ed25519 ---------------------------------------------------------------------
def ed25519_keypair() -> tuple[bytes, bytes]:
    """Return ``(private_seed, public_key)``, 32 raw bytes each (RFC 8032)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def ed25519_public(private_seed: bytes) -> bytes:
    """The raw public key of a raw 32-byte Ed25519 private key (its RFC 8032 seed)."""
    return Ed25519PrivateKey.from_private_bytes(private_seed).public_key().public_bytes_raw()


def sign(private_seed: bytes, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``message``."""
    return Ed25519PrivateKey.from_private_bytes(private_seed).sign(message)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature.

    Raises:
        CryptoError: if the key is malformed or the signature does not verify.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise CryptoError("signature does not verify") from err


# -- Shamir ----------------------------------------------------------------------
def share_secret(secret: bytes, threshold: int, num_shares: int) -> list[tuple[int, bytes]]:
    """Split a 32-byte secret into ``num_shares`` shares, any ``threshold`` recover it.

    pycryptodome's Shamir works on 16-byte secrets over GF(2^128); the two halves are
    shared with independent polynomials at the same x-coordinates 1..num_shares.

    Returns:
        ``[(index, 32-byte share)]`` with ``index`` in ``1..num_shares``.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got {threshold}, {num_shares}")
    low = Shamir.split(threshold, num_shares, secret[:16])  # type: ignore[call-arg]  # the stub misses ssss=False
    high = Shamir.split(threshold, num_shares, secret[16:])  # type: ignore[call-arg]  # the stub misses ssss=False
    return [(i, a + b) for (i, a), (_, b) in zip(low, high, strict=True)]


def combine_shares(shares: Iterable[tuple[int, bytes]], threshold: int) -> bytes:
    """Recover a secret from at least ``threshold`` distinct shares.

    Raises:
        CryptoError: with fewer than ``threshold`` distinct well-formed shares.
    """
    unique: dict[int, bytes] = {}
    for index, share in shares:
        if len(share) == SECRET_BYTES and index >= 1:
            unique.setdefault(index, share)
    if len(unique) < threshold:
        raise CryptoError(f"{len(unique)} shares, {threshold} needed")
    chosen: Sequence[tuple[int, bytes]] = sorted(unique.items())[:threshold]
    low = Shamir.combine([(i, s[:16]) for i, s in chosen])  # type: ignore[call-arg]  # the stub misses ssss=False
    high = Shamir.combine([(i, s[16:]) for i, s in chosen])  # type: ignore[call-arg]  # the stub misses ssss=False
    return low + high
