"""Cryptographic primitives of SecAgg+, all from pycryptodome.

- X25519 key agreement (``Crypto.Protocol.DH``, RFC 7748) with HKDF-SHA256
  (``Crypto.Protocol.KDF.HKDF``, RFC 5869) as the key-derivation function;
- AES-256-GCM (``Crypto.Cipher.AES``) to encrypt secret shares between clients;
- Ed25519 signatures (``Crypto.Signature.eddsa``, RFC 8032);
- Shamir secret sharing over GF(2^128) (``Crypto.Protocol.SecretSharing.Shamir``),
  applied to the two 16-byte halves of a raw 32-byte secret;
- SHA-256 for transcripts (``Crypto.Hash.SHA256``).

Nothing here is a hand-made primitive: the functions only fix encodings and labels.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

SECRET_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PROTOCOL_LABEL = b"flwr-guard/secagg+/v1"


class CryptoError(ValueError):
    """A signature, ciphertext, key or share did not verify or parse."""


def transcript(*parts: bytes) -> bytes:
    """SHA-256 of length-prefixed ``parts`` (unambiguous: no two lists collide)."""
    digest = SHA256.new(PROTOCOL_LABEL)
    for part in parts:
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    return digest.digest()


def random_secret() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return os.urandom(SECRET_BYTES)


# -- X25519 + HKDF ---------------------------------------------------------------
def x25519_keypair() -> tuple[bytes, bytes]:
    """Return ``(private_seed, public_key)``, both 32 raw bytes (RFC 7748 encoding)."""
    key = ECC.generate(curve="Curve25519")
    return key.seed, key.public_key().export_key(format="raw")


def x25519_public(private_seed: bytes) -> bytes:
    """The raw public key of a raw 32-byte X25519 private key."""
    return import_x25519_private_key(private_seed).public_key().export_key(format="raw")


def agree(private_seed: bytes, peer_public: bytes, salt: bytes, info: bytes) -> bytes:
    """X25519 shared secret of two parties, through HKDF-SHA256 -> 32 bytes.

    Both parties get the same output; ``salt`` binds it to the round (the transcript
    digest), ``info`` to the purpose (mask seed or encryption key).

    Raises:
        CryptoError: if ``peer_public`` is not a valid X25519 public key.
    """
    try:
        peer = import_x25519_public_key(peer_public)
    except (ValueError, TypeError) as err:
        raise CryptoError(f"invalid X25519 public key: {err}") from err
    return key_agreement(
        static_priv=import_x25519_private_key(private_seed),
        static_pub=peer,
        kdf=lambda z: HKDF(z, SECRET_BYTES, salt, SHA256, context=info),
    )


# -- AES-GCM ---------------------------------------------------------------------
def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12) || ciphertext || tag (16)`` with a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return nonce + ciphertext + tag


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises:
        CryptoError: if the blob is too short or does not authenticate.
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("ciphertext too short")
    nonce, body, tag = blob[:NONCE_BYTES], blob[NONCE_BYTES:-TAG_BYTES], blob[-TAG_BYTES:]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
    cipher.update(aad)
    try:
        return cipher.decrypt_and_verify(body, tag)
    except ValueError as err:
        raise CryptoError("ciphertext does not authenticate") from err


# -- Ed25519 ---------------------------------------------------------------------
def ed25519_keypair() -> tuple[bytes, bytes]:
    """Return ``(private_seed, public_key)``, 32 raw bytes each (RFC 8032)."""
    key = ECC.generate(curve="Ed25519")
    return key.seed, key.public_key().export_key(format="raw")


def ed25519_public(private_seed: bytes) -> bytes:
    """The raw public key of a raw 32-byte Ed25519 private key."""
    return eddsa.import_private_key(private_seed).public_key().export_key(format="raw")


def sign(private_seed: bytes, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``message``."""
    return eddsa.new(eddsa.import_private_key(private_seed), "rfc8032").sign(message)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature.

    Raises:
        CryptoError: if the key is malformed or the signature does not verify.
    """
    try:
        eddsa.new(eddsa.import_public_key(public_key), "rfc8032").verify(message, signature)
    except (ValueError, TypeError) as err:
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
    low = Shamir.split(threshold, num_shares, secret[:16])
    high = Shamir.split(threshold, num_shares, secret[16:])
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
    low = Shamir.combine([(i, s[:16]) for i, s in chosen])
    high = Shamir.combine([(i, s[16:]) for i, s in chosen])
    return low + high
