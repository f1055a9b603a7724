"""The SecAgg+ messages and their wire formats (no Flower imports).

What the client and the server state machines (:mod:`flwr_guard.secagg.client`,
:mod:`flwr_guard.secagg.server`, and for multi-round sessions
:mod:`flwr_guard.secagg.session_client`, :mod:`flwr_guard.secagg.session_server`)
exchange: a client's signed :class:`Advertisement` and the :class:`RosterEntry` every
client receives of every other, fixed-width packings of rosters, revealed graph nonces
and advertisements, the sizes of encrypted shares and the two kinds of revealed share,
and a session round's replies (:class:`RoundInput`, :class:`RoundReveal`). Unpacking
checks lengths and ranges before use and raises
:class:`~flwr_guard.secagg.errors.ProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from flwr_guard.secagg import crypto
from flwr_guard.secagg.constants import Key
from flwr_guard.secagg.errors import ProtocolError

# The two kinds of share a client reveals at unmask (never both for one peer).
SELF_MASK = "self-mask"
MASK_KEY = "mask-key"
# A share of the per-round protocol: 2-byte index, self-mask seed share, mask-key share.
SHARE_PLAINTEXT_BYTES = 2 + 2 * crypto.SECRET_BYTES
MAX_SHARE_CIPHERTEXT_BYTES = crypto.NONCE_BYTES + SHARE_PLAINTEXT_BYTES + crypto.TAG_BYTES


@dataclass(frozen=True)
class Advertisement:
    """A client's signed public keys for one round (stage 1 reply).

    The signature covers the round context, the id, the signing key, the commitment
    to the graph nonce and a digest of the round keys (:meth:`keys_digest`), so the
    104-byte-plus :class:`RosterEntry` that every client receives of every other is
    verifiable on its own.
    """

    node_id: int
    encryption_key: bytes
    mask_key: bytes
    signing_key: bytes
    self_mask_commitment: bytes
    nonce_commitment: bytes
    signature: bytes

    def keys_digest(self) -> bytes:
        return crypto.transcript(
            b"round-keys", self.encryption_key, self.mask_key, self.self_mask_commitment
        )

    def signed_payload(self, context_digest: bytes) -> bytes:
        return RosterEntry.of(self).signed_payload(context_digest)

    def verify(self, context_digest: bytes) -> None:
        """Raises :class:`crypto.CryptoError` if the signature does not verify."""
        RosterEntry.of(self).verify(context_digest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "encryption_key": self.encryption_key,
            "mask_key": self.mask_key,
            "signing_key": self.signing_key,
            "self_mask_commitment": self.self_mask_commitment,
            "nonce_commitment": self.nonce_commitment,
            "signature": self.signature,
        }

    def to_bytes(self) -> bytes:
        """Fixed-width binary form (:data:`ADVERTISEMENT_BYTES` bytes: big-endian id,
        then the keys, commitments and signature).

        Raises:
            ProtocolError: a field has another length than X25519 / Ed25519 / SHA-256 give.
        """
        fields = (self.encryption_key, self.mask_key, self.signing_key,
                  self.self_mask_commitment, self.nonce_commitment, self.signature)
        if (not all(isinstance(f, bytes) for f in fields)
                or tuple(map(len, fields)) != _AD_FIELD_BYTES or not _is_id(self.node_id)):
            raise ProtocolError(f"advertisement of node {self.node_id!r} has malformed fields")
        return struct.pack(">Q", self.node_id) + b"".join(fields)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Advertisement:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ProtocolError: ``blob`` is not :data:`ADVERTISEMENT_BYTES` long.
        """
        if len(blob) != ADVERTISEMENT_BYTES:
            raise ProtocolError(f"advertisement of {len(blob)} bytes, {ADVERTISEMENT_BYTES} expected")
        (node_id,) = struct.unpack(">Q", blob[:8])
        parts, pos = [], 8
        for size in _AD_FIELD_BYTES:
            parts.append(bytes(blob[pos : pos + size]))
            pos += size
        return cls(node_id, *parts)

    @classmethod
    def from_dict(cls, data: Any) -> Advertisement:
        """Parse a (possibly hostile) advertisement: every field is type- and
        length-checked before use (no ``bytes(int)`` allocation).

        Raises:
            ProtocolError: a missing field, another type or length, an id outside uint64.
        """
        if not isinstance(data, dict):
            raise ProtocolError("malformed advertisement: not a mapping")
        node_id = data.get("node_id")
        if not _is_id(node_id):
            raise ProtocolError(f"malformed advertisement: node id {node_id!r} is not a uint64")
        names = ("encryption_key", "mask_key", "signing_key", "self_mask_commitment",
                 "nonce_commitment", "signature")
        values = []
        for name, size in zip(names, _AD_FIELD_BYTES, strict=True):
            value = data.get(name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ProtocolError(f"malformed advertisement: {name} must be {size} bytes")
            values.append(value)
        return cls(node_id, *values)


def _is_id(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


# encryption key, mask key, signing key, self-mask commitment, nonce commitment, signature
_AD_FIELD_BYTES = (32, 32, 32, 32, 32, 64)
ADVERTISEMENT_BYTES = 8 + sum(_AD_FIELD_BYTES)  # 232


@dataclass(frozen=True)
class RosterEntry:
    """What every client learns of every advertiser: id, signing key, the commitment
    to its graph nonce, the digest of its round keys and its signature over them, all
    verifiable without the full advertisement (:meth:`verify`)."""

    node_id: int
    signing_key: bytes
    nonce_commitment: bytes
    keys_digest: bytes
    signature: bytes

    @classmethod
    def of(cls, ad: Advertisement) -> RosterEntry:
        return cls(ad.node_id, ad.signing_key, ad.nonce_commitment, ad.keys_digest(), ad.signature)

    def signed_payload(self, context_digest: bytes) -> bytes:
        return crypto.transcript(
            b"advertise", context_digest, struct.pack(">Q", self.node_id),
            self.signing_key, self.nonce_commitment, self.keys_digest,
        )

    def verify(self, context_digest: bytes) -> None:
        """Raises :class:`crypto.CryptoError` if the signature does not verify."""
        crypto.verify(self.signing_key, self.signed_payload(context_digest), self.signature)


ROSTER_ENTRY_BYTES = 8 + 32 + 32 + 32 + 64  # 168: id, key, nonce commitment, keys digest, signature
NONCE_ENTRY_BYTES = 8 + crypto.SECRET_BYTES  # id, revealed nonce


def pack_roster(entries: Iterable[RosterEntry]) -> bytes:
    """Concatenation of :data:`ROSTER_ENTRY_BYTES`-byte records, in the given order.

    Raises:
        ProtocolError: an id outside uint64, or a field of another length.
    """
    out = []
    for e in entries:
        fields = (e.signing_key, e.nonce_commitment, e.keys_digest, e.signature)
        if tuple(map(len, fields)) != (32, 32, 32, 64) or not _is_id(e.node_id):
            raise ProtocolError(f"roster entry of node {e.node_id!r} has malformed fields")
        out.append(struct.pack(">Q", e.node_id) + b"".join(fields))
    return b"".join(out)


def unpack_roster(blob: bytes) -> list[RosterEntry]:
    """Inverse of :func:`pack_roster`.

    Raises:
        ProtocolError: the length is not a multiple of :data:`ROSTER_ENTRY_BYTES`.
    """
    if not isinstance(blob, bytes) or len(blob) % ROSTER_ENTRY_BYTES:
        raise ProtocolError("roster is not whole entries")
    entries = []
    for pos in range(0, len(blob), ROSTER_ENTRY_BYTES):
        (node_id,) = struct.unpack(">Q", blob[pos : pos + 8])
        p = pos + 8
        entries.append(RosterEntry(node_id, blob[p : p + 32], blob[p + 32 : p + 64],
                                   blob[p + 64 : p + 96], blob[p + 96 : p + 160]))
    return entries


def pack_nonces(nonces: Mapping[int, bytes]) -> bytes:
    """Revealed graph nonces as sorted (id, 32-byte nonce) records.

    Raises:
        ProtocolError: an id outside uint64 or a nonce of another length.
    """
    out = []
    for node in sorted(nonces):
        if not _is_id(node) or len(nonces[node]) != crypto.SECRET_BYTES:
            raise ProtocolError(f"graph nonce of node {node!r} is malformed")
        out.append(struct.pack(">Q", node) + nonces[node])
    return b"".join(out)


def unpack_nonces(blob: bytes) -> dict[int, bytes]:
    """Inverse of :func:`pack_nonces`.

    Raises:
        ProtocolError: not whole records, or an id repeated.
    """
    if not isinstance(blob, bytes) or len(blob) % NONCE_ENTRY_BYTES:
        raise ProtocolError("graph nonces are not whole records")
    out: dict[int, bytes] = {}
    for pos in range(0, len(blob), NONCE_ENTRY_BYTES):
        (node,) = struct.unpack(">Q", blob[pos : pos + 8])
        if node in out:
            raise ProtocolError(f"graph nonce of node {node} given twice")
        out[node] = blob[pos + 8 : pos + NONCE_ENTRY_BYTES]
    return out


def pack_advertisements(ads: Iterable[Advertisement]) -> bytes:
    """Concatenation of :meth:`Advertisement.to_bytes` (raises as it does)."""
    return b"".join(a.to_bytes() for a in ads)


def unpack_advertisements(blob: bytes) -> list[Advertisement]:
    """Inverse of :func:`pack_advertisements`.

    Raises:
        ProtocolError: the length is not a multiple of :data:`ADVERTISEMENT_BYTES`.
    """
    if not isinstance(blob, bytes) or len(blob) % ADVERTISEMENT_BYTES:
        raise ProtocolError("advertisements are not whole records")
    return [Advertisement.from_bytes(blob[p : p + ADVERTISEMENT_BYTES])
            for p in range(0, len(blob), ADVERTISEMENT_BYTES)]


# -- multi-round sessions (flwr_guard.secagg.session_client / session_server) ----------
# A session round's share: 2-byte index, the 32-byte share of the round's self-mask seed.
ROUND_SHARE_PLAINTEXT_BYTES = 2 + crypto.SECRET_BYTES
ROUND_SHARE_CIPHERTEXT_BYTES = crypto.NONCE_BYTES + ROUND_SHARE_PLAINTEXT_BYTES + crypto.TAG_BYTES


@dataclass
class RoundInput:
    """A client's reply to a session round's input message.

    Attributes:
        vector: the masked vector, uint32/uint64 of length ``vector_length``.
        self_mask_commitment: SHA-256 commitment to this round's self-mask seed.
        ciphertexts: neighbour id -> the encrypted share of the self-mask seed it holds.
        clipped: coordinates clipped to ``[-r, r]``.
        pair_commitments: neighbour id -> :func:`commit_pair_seed` of the pair's seed
            of this round, one per neighbour (the server refuses an input without them).
        signature: Ed25519 signature of
            :func:`~flwr_guard.secagg.transcripts.session_input_payload` (the two
            commitments, bound to the round digest) under the client's roster key.
    """

    vector: np.ndarray
    self_mask_commitment: bytes
    ciphertexts: dict[int, bytes]
    clipped: int
    pair_commitments: dict[int, bytes] = field(default_factory=dict)
    signature: bytes = b""


@dataclass
class RoundReveal:
    """A client's unmask reply: its own self-mask seed, the shares it holds of its
    active neighbours' seeds (``peer -> (index, 32 bytes)``), the round's pair seeds
    with its neighbours out of U3, the active neighbours whose share did not open, and
    its Ed25519 signature of
    :func:`~flwr_guard.secagg.transcripts.session_reveal_payload` (the pair seeds,
    bound to the round digest)."""

    self_mask_seed: bytes
    shares: dict[int, tuple[int, bytes]]
    pair_seeds: dict[int, bytes]
    bad_senders: list[int]
    signature: bytes = b""


@dataclass(frozen=True)
class CulpritEvidence:
    """What proves that a session member revealed a wrong pair seed: its two signed
    statements of one round (docs/secagg.md, "Recovery from a wrong pair seed").

    Attributes:
        self_mask_commitment: 32 bytes, from its input.
        pair_commitments: neighbour id -> 32-byte commitment, from its input.
        input_signature: 64 bytes, its signature of the two commitments
            (:func:`~flwr_guard.secagg.transcripts.session_input_payload`).
        pair_seeds: neighbour id -> 32-byte seed, from its reveal.
        reveal_signature: 64 bytes, its signature of the pair seeds
            (:func:`~flwr_guard.secagg.transcripts.session_reveal_payload`).
    """

    self_mask_commitment: bytes
    pair_commitments: dict[int, bytes]
    input_signature: bytes
    pair_seeds: dict[int, bytes]
    reveal_signature: bytes

    def to_wire(self) -> dict[str, Any]:
        """The codec form (ids as decimal string keys)."""
        return {
            Key.COMMITMENT: self.self_mask_commitment,
            Key.PAIR_COMMITMENTS: {str(p): c for p, c in self.pair_commitments.items()},
            Key.INPUT_SIGNATURE: self.input_signature,
            Key.PAIR_SEEDS: {str(p): s for p, s in self.pair_seeds.items()},
            Key.REVEAL_SIGNATURE: self.reveal_signature,
        }

    @classmethod
    def from_wire(cls, data: Any, limit: int) -> CulpritEvidence:
        """Parse (possibly hostile) evidence: every field type- and length-checked, at
        most ``limit`` entries per map.

        Raises:
            ProtocolError: a missing field, another type or length, a key that is not
                a node id, more than ``limit`` entries.
        """
        if not isinstance(data, dict):
            raise ProtocolError("malformed evidence: not a mapping")

        def fixed(name: str, size: int) -> bytes:
            value = data.get(name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ProtocolError(f"malformed evidence: {name} must be {size} bytes")
            return value

        def id_map(name: str) -> dict[int, bytes]:
            raw = data.get(name)
            if not isinstance(raw, dict) or len(raw) > limit:
                raise ProtocolError(f"malformed evidence: {name} must map at most {limit} node ids to bytes")
            out = {}
            for key, value in raw.items():
                if not (isinstance(key, str) and key.isdigit() and len(key) <= 20 and int(key) < 2**64):
                    raise ProtocolError(f"malformed evidence: {name} has a key that is not a node id")
                if not isinstance(value, bytes) or len(value) != crypto.SECRET_BYTES:
                    raise ProtocolError(f"malformed evidence: {name} values must be {crypto.SECRET_BYTES} bytes")
                out[int(key)] = value
            return out

        return cls(fixed(Key.COMMITMENT, 32), id_map(Key.PAIR_COMMITMENTS), fixed(Key.INPUT_SIGNATURE, 64),
                   id_map(Key.PAIR_SEEDS), fixed(Key.REVEAL_SIGNATURE, 64))


def pack_open(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Wire form of :meth:`SessionServer.open_payload
    <flwr_guard.secagg.session_server.SessionServer.open_payload>`."""
    return {"nonces": pack_nonces(payload["nonces"]),
            "advertisements": pack_advertisements(payload["advertisements"])}
