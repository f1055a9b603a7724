"""The client side of SecAgg+ as a state machine (no Flower imports).

Protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS 2017, section 4, the actively secure variant with signatures and
the consistency check), over the sparse neighbour graph of Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020, section 3).

Stages, each one request from the server and one reply:

1. :meth:`SecAggClient.advertise`: fresh X25519 keys for share encryption and for
   pairwise masks, signed with the client's long-term Ed25519 key over the round
   context (which includes the hash of the model the server will send).
2. :meth:`SecAggClient.share_keys`: from the roster of U1 (every advertiser's id,
   signing key and signature) check ids and signing keys (trusted or pinned) and derive
   the neighbour graph; verify the neighbours' full signed keys (same round context,
   equal to their roster entries), Shamir-share the self-mask seed and the mask key
   among the neighbours, encrypt each share for its holder (AES-GCM under an
   X25519+HKDF key).
3. :meth:`SecAggClient.masked_input`: check the received model against the announced
   hash, decrypt the shares held for neighbours, quantise the update, mask it with the
   self mask and the pairwise masks of the neighbours that shared.
4. :meth:`SecAggClient.consistency`: sign the set of clients whose input is in the sum.
5. :meth:`SecAggClient.unmask`: after checking the peers' signatures on that set, reveal
   for each neighbour either the share of its self-mask seed (it is in the sum) or of
   its mask key (it dropped) — never both, never below the threshold.

A client that finds anything inconsistent raises :class:`ProtocolError` and sends
nothing more in the round.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.context import RoundContext, ids_bytes
from flwr_guard.secagg.graph import neighbours
from flwr_guard.secagg.quantization import quantize

SELF_MASK = "self-mask"
MASK_KEY = "mask-key"


class ProtocolError(RuntimeError):
    """The client refuses to continue the round: the server or a peer misbehaved."""


@dataclass(frozen=True)
class Advertisement:
    """A client's signed public keys for one round (stage 1 reply)."""

    node_id: int
    encryption_key: bytes
    mask_key: bytes
    signing_key: bytes
    self_mask_commitment: bytes
    signature: bytes

    def signed_payload(self, context_digest: bytes) -> bytes:
        return crypto.transcript(
            b"advertise",
            context_digest,
            struct.pack(">Q", self.node_id),
            self.encryption_key,
            self.mask_key,
            self.signing_key,
            self.self_mask_commitment,
        )

    def verify(self, context_digest: bytes) -> None:
        """Raises :class:`crypto.CryptoError` if the signature does not verify."""
        crypto.verify(self.signing_key, self.signed_payload(context_digest), self.signature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "encryption_key": self.encryption_key,
            "mask_key": self.mask_key,
            "signing_key": self.signing_key,
            "self_mask_commitment": self.self_mask_commitment,
            "signature": self.signature,
        }

    def to_bytes(self) -> bytes:
        """Fixed-width binary form (:data:`ADVERTISEMENT_BYTES` bytes: big-endian id,
        then the keys, commitment and signature).

        Raises:
            ProtocolError: a field has another length than X25519 / Ed25519 / SHA-256 give.
        """
        fields = (self.encryption_key, self.mask_key, self.signing_key,
                  self.self_mask_commitment, self.signature)
        if tuple(map(len, fields)) != _AD_FIELD_BYTES or not 0 <= self.node_id < 2**64:
            raise ProtocolError(f"advertisement of node {self.node_id} has malformed fields")
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
    def from_dict(cls, data: dict[str, Any]) -> Advertisement:
        try:
            return cls(
                node_id=int(data["node_id"]),
                encryption_key=bytes(data["encryption_key"]),
                mask_key=bytes(data["mask_key"]),
                signing_key=bytes(data["signing_key"]),
                self_mask_commitment=bytes(data["self_mask_commitment"]),
                signature=bytes(data["signature"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed advertisement: {err}") from err


# encryption key, mask key, signing key, self-mask commitment, signature
_AD_FIELD_BYTES = (32, 32, 32, 32, 64)
ADVERTISEMENT_BYTES = 8 + sum(_AD_FIELD_BYTES)  # 200


@dataclass(frozen=True)
class RosterEntry:
    """What every client learns of every advertiser in share-keys: enough to derive the
    neighbour graph (:func:`graph_seed` hashes the ids and signatures) and to check and
    pin the signing keys of all n, without the other n - k advertisements."""

    node_id: int
    signing_key: bytes
    signature: bytes

    @classmethod
    def of(cls, ad: Advertisement) -> RosterEntry:
        return cls(ad.node_id, ad.signing_key, ad.signature)


ROSTER_ENTRY_BYTES = 8 + 32 + 64  # id, Ed25519 public key, Ed25519 signature


def pack_roster(entries: Iterable[RosterEntry]) -> bytes:
    """Concatenation of :data:`ROSTER_ENTRY_BYTES`-byte records (big-endian id, key,
    signature), in the given order.

    Raises:
        ProtocolError: an id outside uint64, or a key or signature of another length.
    """
    out = []
    for e in entries:
        if len(e.signing_key) != 32 or len(e.signature) != 64 or not 0 <= e.node_id < 2**64:
            raise ProtocolError(f"roster entry of node {e.node_id} has malformed fields")
        out.append(struct.pack(">Q", e.node_id) + e.signing_key + e.signature)
    return b"".join(out)


def unpack_roster(blob: bytes) -> list[RosterEntry]:
    """Inverse of :func:`pack_roster`.

    Raises:
        ProtocolError: the length is not a multiple of :data:`ROSTER_ENTRY_BYTES`.
    """
    if len(blob) % ROSTER_ENTRY_BYTES:
        raise ProtocolError(f"roster of {len(blob)} bytes is not whole entries")
    entries = []
    for pos in range(0, len(blob), ROSTER_ENTRY_BYTES):
        (node_id,) = struct.unpack(">Q", blob[pos : pos + 8])
        entries.append(RosterEntry(node_id, bytes(blob[pos + 8 : pos + 40]),
                                   bytes(blob[pos + 40 : pos + ROSTER_ENTRY_BYTES])))
    return entries


def pack_advertisements(ads: Iterable[Advertisement]) -> bytes:
    """Concatenation of :meth:`Advertisement.to_bytes` (raises as it does)."""
    return b"".join(a.to_bytes() for a in ads)


def unpack_advertisements(blob: bytes) -> list[Advertisement]:
    """Inverse of :func:`pack_advertisements`.

    Raises:
        ProtocolError: the length is not a multiple of :data:`ADVERTISEMENT_BYTES`.
    """
    if len(blob) % ADVERTISEMENT_BYTES:
        raise ProtocolError(f"advertisements of {len(blob)} bytes are not whole records")
    return [Advertisement.from_bytes(blob[p : p + ADVERTISEMENT_BYTES])
            for p in range(0, len(blob), ADVERTISEMENT_BYTES)]


def commit_self_mask(seed: bytes) -> bytes:
    """Binding commitment to a self-mask seed (SHA-256 of a 256-bit random value), so
    the server can check a reconstruction without learning anything before it."""
    return crypto.transcript(b"self-mask-commitment", seed)


def graph_seed(
    context_digest: bytes, advertisements: Sequence[Advertisement | RosterEntry]
) -> bytes:
    """Seed of the neighbour graph: a hash of the context and the signatures of all of
    U1 in id order (the same from advertisements or from their roster entries)."""
    ordered = sorted(advertisements, key=lambda a: a.node_id)
    return crypto.transcript(b"graph", context_digest, *(a.signature for a in ordered))


def share_aad(context_digest: bytes, sender: int, recipient: int) -> bytes:
    return crypto.transcript(b"share", context_digest, struct.pack(">QQ", sender, recipient))


def consistency_payload(context_digest: bytes, survivors: list[int]) -> bytes:
    return crypto.transcript(b"consistency", context_digest, ids_bytes(survivors))


def pairwise_seed(own_mask_secret: bytes, peer_mask_public: bytes, context_digest: bytes) -> bytes:
    """Seed of the pairwise mask of two clients (the same from both ends)."""
    return crypto.agree(own_mask_secret, peer_mask_public, context_digest, b"pairwise-mask")


def pairwise_sign(own: int, peer: int) -> int:
    """+1 if ``own < peer`` else -1: the pair's masks cancel in the sum."""
    return 1 if own < peer else -1


@dataclass
class SecAggClient:
    """One client's SecAgg+ state for one round; survives process restarts via
    :meth:`to_state` / :meth:`from_state` (Flower starts a ClientApp per message).

    Args:
        node_id: this client's id in the cohort.
        signing_secret: the client's long-term Ed25519 private key (32 raw bytes).
        trusted_keys: node id -> Ed25519 public key known out of band; when given,
            a peer whose signing key differs is refused (defeats key substitution).
        pinned_keys: node id -> signing key seen in earlier rounds (trust on first
            use); a peer whose key changed is refused.

    Secrets of the round, and how long they live: the X25519 share-encryption private
    key from :meth:`advertise` until :meth:`share_keys`, which derives the k
    per-neighbour AES keys (``share_encryption_keys``) and erases it; those keys until
    :meth:`masked_input` has opened the shares addressed to this client, then they are
    erased too. The mask key and self-mask seed stay for the round.

    From share-keys on, ``roster`` holds the id, signing key and signature of every
    client in U1 (104 bytes each: what the graph and the survivor-set checks need) and
    ``advertisements`` only this client's own and its k neighbours' full advertisements
    (every later stage uses the keys of neighbours only).
    """

    node_id: int
    signing_secret: bytes
    trusted_keys: dict[int, bytes] = field(default_factory=dict)
    pinned_keys: dict[int, bytes] = field(default_factory=dict)
    context: RoundContext | None = None
    encryption_secret: bytes = b""
    share_encryption_keys: dict[int, bytes] = field(default_factory=dict)
    mask_secret: bytes = b""
    self_mask_seed: bytes = b""
    advertisements: dict[int, Advertisement] = field(default_factory=dict)
    roster: dict[int, RosterEntry] = field(default_factory=dict)
    neighbour_ids: list[int] = field(default_factory=list)
    shared_ids: list[int] = field(default_factory=list)
    held_shares: dict[int, tuple[int, bytes, bytes]] = field(default_factory=dict)
    signed_survivors: list[int] | None = None
    revealed: dict[int, str] = field(default_factory=dict)

    # -- stage 1 -------------------------------------------------------------------
    def advertise(self, context: RoundContext) -> Advertisement:
        """Generate this round's keys and sign them over the round context.

        Raises:
            ProtocolError: if this client is not in the cohort.
        """
        if self.node_id not in context.cohort:
            raise ProtocolError(f"node {self.node_id} is not in the announced cohort")
        self.context = context
        self.encryption_secret, encryption_public = crypto.x25519_keypair()
        self.mask_secret, mask_public = crypto.x25519_keypair()
        self.self_mask_seed = crypto.random_secret()
        unsigned = Advertisement(
            node_id=self.node_id,
            encryption_key=encryption_public,
            mask_key=mask_public,
            signing_key=crypto.ed25519_public(self.signing_secret),
            self_mask_commitment=commit_self_mask(self.self_mask_seed),
            signature=b"",
        )
        signature = crypto.sign(self.signing_secret, unsigned.signed_payload(context.digest()))
        own = dataclasses.replace(unsigned, signature=signature)
        self.advertisements = {self.node_id: own}
        return own

    # -- stage 2 -------------------------------------------------------------------
    def share_keys(
        self,
        advertisements: Sequence[Advertisement],
        roster: Sequence[RosterEntry] | None = None,
    ) -> dict[int, bytes]:
        """Verify the neighbours' keys and return ``{neighbour id: encrypted shares}``.

        Args:
            advertisements: the full advertisements of at least this client's
                neighbours (the server sends exactly those; more are accepted if they
                match the roster, and only the neighbours' are kept).
            roster: :class:`RosterEntry` of every client in U1. ``None``: taken from
                ``advertisements``, which must then hold all of U1 (the O(n) form).

        Raises:
            ProtocolError: a neighbour's keys do not verify under this round's context
                (the server sent different rounds or models to different clients), a
                signing key in the roster is not the trusted or pinned one, this
                client's own entry or advertisement was altered, ids repeat or fall
                outside the cohort, an advertisement differs from its roster entry, a
                neighbour's advertisement is missing, or fewer than
                ``reconstruction_threshold`` neighbours remain.
        """
        context = self._require_context()
        digest = context.digest()
        own = self.advertisements.get(self.node_id)
        if roster is None:
            roster = [RosterEntry.of(a) for a in advertisements]
        entries: dict[int, RosterEntry] = {}
        for entry in roster:
            if entry.node_id in entries:
                raise ProtocolError(f"node {entry.node_id} advertised twice")
            if entry.node_id not in context.cohort:
                raise ProtocolError(f"node {entry.node_id} is not in the cohort")
            expected_key = self.trusted_keys.get(entry.node_id) or self.pinned_keys.get(entry.node_id)
            if expected_key is not None and expected_key != entry.signing_key:
                raise ProtocolError(f"node {entry.node_id} signs with an unexpected key")
            entries[entry.node_id] = entry
        if own is None or entries.get(self.node_id) != RosterEntry.of(own):
            raise ProtocolError("this client's own advertisement is missing or altered")
        # Same seed and graph as the server's (it hashes the same ids and signatures).
        graph = neighbours(list(entries), context.params.num_shares, graph_seed(digest, list(entries.values())))
        self.neighbour_ids = graph[self.node_id]
        by_id: dict[int, Advertisement] = {}
        for ad in advertisements:
            if ad.node_id in by_id:
                raise ProtocolError(f"node {ad.node_id} advertised twice")
            if entries.get(ad.node_id) != RosterEntry.of(ad):
                raise ProtocolError(f"advertisement of node {ad.node_id} differs from its roster entry")
            by_id[ad.node_id] = ad
        if by_id.get(self.node_id, own) != own:
            raise ProtocolError("this client's own advertisement is missing or altered")
        missing = [peer for peer in self.neighbour_ids if peer not in by_id]
        if missing:
            raise ProtocolError(f"advertisements of neighbours {missing} are missing")
        # Verify the keys this client will use: its neighbours'. The graph is
        # connected, so a server that shows clients different contexts is caught on
        # some edge; O(k) signature checks per client instead of O(n).
        for peer in self.neighbour_ids:
            try:
                by_id[peer].verify(digest)
            except crypto.CryptoError as err:
                raise ProtocolError(
                    f"keys of node {peer} were signed for another round context "
                    "(run, round, cohort, parameters or model hash differ)"
                ) from err
        threshold = context.params.reconstruction_threshold
        if len(self.neighbour_ids) < threshold:
            raise ProtocolError(
                f"{len(self.neighbour_ids)} neighbours, reconstruction threshold {threshold}"
            )
        self.roster = entries
        self.advertisements = {self.node_id: own, **{p: by_id[p] for p in self.neighbour_ids}}
        self.pinned_keys.update({i: e.signing_key for i, e in entries.items()})
        count = len(self.neighbour_ids)
        self_mask_shares = crypto.share_secret(self.self_mask_seed, threshold, count)
        mask_key_shares = crypto.share_secret(self.mask_secret, threshold, count)
        out: dict[int, bytes] = {}
        # One key per neighbour encrypts this client's shares for it and decrypts its
        # shares for this client in masked-input: agree once, keep the key.
        self.share_encryption_keys = {}
        for peer, (index, b_share), (_, sk_share) in zip(
            self.neighbour_ids, self_mask_shares, mask_key_shares, strict=True
        ):
            key = crypto.agree(
                self.encryption_secret, by_id[peer].encryption_key, digest, b"share-encryption"
            )
            self.share_encryption_keys[peer] = key
            plaintext = struct.pack(">H", index) + b_share + sk_share
            out[peer] = crypto.encrypt(key, plaintext, share_aad(digest, self.node_id, peer))
        self.encryption_secret = b""  # every key it can give is derived: erase it
        return out

    # -- stage 3 -------------------------------------------------------------------
    def masked_input(
        self,
        shared_ids: list[int],
        ciphertexts: dict[int, bytes],
        update: np.ndarray,
        weight: int,
        received_model_hash: bytes,
        rng: np.random.Generator | None = None,
        metric_values: Sequence[int] = (),
        noise: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[int], int]:
        """Mask the weighted, quantised update.

        Args:
            shared_ids: U2, the clients whose shares the server routed (incl. self).
            ciphertexts: sender id -> the shares that sender encrypted for this client.
            update: float array, flattened model update, length ``update_length``.
            weight: integer weight in ``[1, max_weight]`` (e.g. number of examples).
            received_model_hash: hash of the global model this client trained from.
            metric_values: one integer in ``[0, max_weight]`` per name of the context's
                ``masked_metrics`` (summed unweighted).
            noise: optional int64 ``(update_length,)`` added to the weighted, quantised
                update before masking (distributed DP: Skellam noise, see
                :func:`flwr_guard.dp.distributed.skellam_noise_for_secagg`); negative
                values wrap modulo ``2^bits`` like every other term.

        Returns:
            ``(masked, bad_senders, clipped)``: uint32/uint64 vector of length
            ``vector_length``; ids of neighbours whose shares did not decrypt or
            parse (the server excludes them); number of clipped coordinates.

        Raises:
            ProtocolError: the model differs from the announced one, U2 is not a subset
                of the verified cohort, or too few neighbours shared.
            ValueError: for an update of the wrong length, with NaN/Inf, or a weight
                out of range.
        """
        context = self._require_context()
        params = context.params
        if received_model_hash != context.model_hash:
            raise ProtocolError(
                "the global model received differs from the one announced for the round "
                "(model-inconsistency attack?)"
            )
        survivors = set(shared_ids)
        if not survivors <= set(self.roster) or self.node_id not in survivors:
            raise ProtocolError("the set of clients that shared keys is inconsistent")
        active_neighbours = [v for v in self.neighbour_ids if v in survivors]
        if len(active_neighbours) < params.reconstruction_threshold:
            raise ProtocolError(
                f"only {len(active_neighbours)} neighbours shared keys, threshold "
                f"{params.reconstruction_threshold}"
            )
        update = np.asarray(update).reshape(-1)
        if update.shape[0] != context.update_length:
            raise ValueError(
                f"update has {update.shape[0]} values, the round expects {context.update_length}"
            )
        metrics = [int(v) for v in metric_values]
        if len(metrics) != len(context.masked_metrics) or any(
            v != m or not 0 <= v <= params.max_weight for v, m in zip(metrics, metric_values)
        ):
            raise ValueError(
                f"masked metrics {list(context.masked_metrics)} need integers in "
                f"[0, {params.max_weight}], got {list(metric_values)}"
            )
        if not 1 <= int(weight) <= params.max_weight:
            raise ValueError(f"weight {weight} outside [1, max_weight={params.max_weight}]")
        digest = context.digest()
        graph = neighbours(
            list(self.roster), params.num_shares, graph_seed(digest, list(self.roster.values()))
        )
        if not self.share_encryption_keys:
            raise ProtocolError(
                "no share-encryption keys: a masked input was already sent this round "
                "(a second one would reveal the difference of two inputs), or share-keys "
                "did not run"
            )
        bad: list[int] = []
        self.held_shares = {}
        for sender in active_neighbours:
            share = self._open_share(sender, ciphertexts.get(sender), digest)
            if share is None or share[0] != graph[sender].index(self.node_id) + 1:
                bad.append(sender)
            else:
                self.held_shares[sender] = share
        self.share_encryption_keys = {}  # the shares are open: the keys are not needed
        self.shared_ids = sorted(survivors)
        q, clipped = quantize(
            update, params.clipping_range, params.quantization_range, rng or np.random.default_rng()
        )
        dtype = prg.mask_dtype(params.modulus_bits)
        vector = np.empty(context.vector_length, dtype=dtype)
        d = context.update_length
        weighted = q * int(weight)
        if noise is not None:
            noise = np.asarray(noise)
            if noise.shape != (d,) or not np.issubdtype(noise.dtype, np.integer):
                raise ValueError(f"noise must be an integer vector of {d} values")
            weighted = weighted + noise.astype(np.int64)
        vector[:d] = weighted.astype(dtype)  # negative values wrap modulo 2^bits
        vector[d:-1] = np.asarray(metrics, dtype=dtype)
        vector[-1] = int(weight)
        vector += prg.expand(self.self_mask_seed, context.vector_length, params.modulus_bits)
        for peer in active_neighbours:
            seed = pairwise_seed(self.mask_secret, self.advertisements[peer].mask_key, digest)
            mask = prg.expand(seed, context.vector_length, params.modulus_bits)
            if pairwise_sign(self.node_id, peer) > 0:
                vector += mask
            else:
                vector -= mask
        return vector, bad, clipped

    def _open_share(
        self, sender: int, blob: bytes | None, digest: bytes
    ) -> tuple[int, bytes, bytes] | None:
        key = self.share_encryption_keys.get(sender)
        if blob is None or key is None:
            return None
        try:
            plaintext = crypto.decrypt(key, blob, share_aad(digest, sender, self.node_id))
        except crypto.CryptoError:
            return None
        if len(plaintext) != 2 + 2 * crypto.SECRET_BYTES:
            return None
        (index,) = struct.unpack(">H", plaintext[:2])
        return index, plaintext[2:34], plaintext[34:66]

    # -- stage 4 -------------------------------------------------------------------
    def consistency(self, survivors: list[int]) -> bytes:
        """Sign U3, the clients whose masked input is in the sum.

        Raises:
            ProtocolError: U3 is not within U2, omits this client, is smaller than the
                reconstruction threshold, or differs from a set signed before.
        """
        context = self._require_context()
        u3 = sorted(set(survivors))
        if not set(u3) <= set(self.shared_ids) or self.node_id not in u3:
            raise ProtocolError("the survivor set is not within the clients that shared keys")
        if len(u3) < context.params.reconstruction_threshold:
            raise ProtocolError(
                f"{len(u3)} survivors is below the reconstruction threshold "
                f"{context.params.reconstruction_threshold}"
            )
        if self.signed_survivors is not None and self.signed_survivors != u3:
            raise ProtocolError("asked to sign a second, different survivor set")
        self.signed_survivors = u3
        return crypto.sign(self.signing_secret, consistency_payload(context.digest(), u3))

    # -- stage 5 -------------------------------------------------------------------
    def unmask(
        self, active: list[int], dropped: list[int], signatures: dict[int, bytes]
    ) -> dict[int, tuple[str, int, bytes]]:
        """Reveal one share per neighbour: its self-mask seed if active, its mask key if
        dropped.

        Returns:
            neighbour id -> ``(kind, index, share)`` with kind ``"self-mask"`` or
            ``"mask-key"``.

        Raises:
            ProtocolError: the active set is not the one this client signed, active and
                dropped overlap, either leaves U2, fewer than ``reconstruction_threshold``
                valid signatures on the active set, a signature does not verify, or a
                neighbour would get both kinds of share revealed.
        """
        context = self._require_context()
        params = context.params
        active_set, dropped_set = set(active), set(dropped)
        if self.signed_survivors is None or sorted(active_set) != self.signed_survivors:
            raise ProtocolError("the active set differs from the survivor set this client signed")
        if active_set & dropped_set:
            raise ProtocolError(
                f"nodes listed both active and dropped: {sorted(active_set & dropped_set)}"
            )
        if not dropped_set <= set(self.shared_ids):
            raise ProtocolError("dropped nodes outside the clients that shared keys")
        if len(active_set) < params.reconstruction_threshold:
            raise ProtocolError("active set below the reconstruction threshold")
        payload = consistency_payload(context.digest(), sorted(active_set))
        valid = 0
        for signer, signature in signatures.items():
            if signer not in active_set or signer not in self.roster:
                raise ProtocolError(f"signature from node {signer}, which is not active")
            if signer not in self.neighbour_ids and signer != self.node_id:
                continue  # neighbourhood check (Bell et al.): O(k) verifications
            try:
                crypto.verify(self.advertisements[signer].signing_key, payload, signature)
            except crypto.CryptoError as err:
                raise ProtocolError(f"consistency signature of node {signer} is invalid") from err
            valid += 1
        if valid < params.reconstruction_threshold:
            raise ProtocolError(
                f"{valid} consistency signatures from neighbours, "
                f"{params.reconstruction_threshold} needed"
            )
        wanted: dict[int, str] = {}
        for peer in self.held_shares:
            if peer in active_set:
                wanted[peer] = SELF_MASK
            elif peer in dropped_set:
                wanted[peer] = MASK_KEY
        for peer, kind in wanted.items():
            if self.revealed.get(peer, kind) != kind:
                raise ProtocolError(f"both shares of node {peer} requested: refusing")
        out = {}
        for peer, kind in wanted.items():
            index, b_share, sk_share = self.held_shares[peer]
            self.revealed[peer] = kind
            out[peer] = (kind, index, b_share if kind == SELF_MASK else sk_share)
        return out

    # -- persistence ---------------------------------------------------------------
    def _require_context(self) -> RoundContext:
        if self.context is None:
            raise ProtocolError("no SecAgg+ round in progress on this client")
        return self.context

    def to_state(self) -> dict[str, Any]:
        """A dict of JSON values and bytes (see :mod:`flwr_guard.secagg.codec`)."""
        return {
            "node_id": self.node_id,
            "context": None if self.context is None else self.context.to_dict(),
            "encryption_secret": self.encryption_secret,
            "share_encryption_keys": [[p, k] for p, k in self.share_encryption_keys.items()],
            "mask_secret": self.mask_secret,
            "self_mask_seed": self.self_mask_seed,
            "advertisements": [a.to_dict() for a in self.advertisements.values()],
            "roster": pack_roster(self.roster.values()),
            "neighbour_ids": self.neighbour_ids,
            "shared_ids": self.shared_ids,
            "held_shares": [[p, i, b, s] for p, (i, b, s) in self.held_shares.items()],
            "signed_survivors": self.signed_survivors,
            "revealed": [[p, k] for p, k in self.revealed.items()],
            "pinned_keys": [[p, k] for p, k in self.pinned_keys.items()],
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], signing_secret: bytes, trusted_keys: dict[int, bytes] | None = None
    ) -> SecAggClient:
        client = cls(
            node_id=int(state["node_id"]),
            signing_secret=signing_secret,
            trusted_keys=dict(trusted_keys or {}),
            pinned_keys={int(p): bytes(k) for p, k in state.get("pinned_keys", [])},
        )
        if state.get("context") is not None:
            client.context = RoundContext.from_dict(state["context"])
        client.encryption_secret = state["encryption_secret"]
        client.share_encryption_keys = {
            int(p): bytes(k) for p, k in state.get("share_encryption_keys", [])
        }
        client.mask_secret = state["mask_secret"]
        client.self_mask_seed = state["self_mask_seed"]
        client.advertisements = {
            a.node_id: a for a in map(Advertisement.from_dict, state["advertisements"])
        }
        # A state saved before the roster existed held all of U1's advertisements.
        roster = (
            unpack_roster(state["roster"])
            if "roster" in state
            else [RosterEntry.of(a) for a in client.advertisements.values()]
        )
        client.roster = {e.node_id: e for e in roster}
        client.neighbour_ids = [int(i) for i in state["neighbour_ids"]]
        client.shared_ids = [int(i) for i in state["shared_ids"]]
        client.held_shares = {int(p): (int(i), b, s) for p, i, b, s in state["held_shares"]}
        client.signed_survivors = state["signed_survivors"]
        client.revealed = {int(p): str(k) for p, k in state["revealed"]}
        return client
