"""The client side of SecAgg+ as a state machine (no Flower imports).

Protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS 2017, section 4, the actively secure variant with signatures and
the consistency check), over the sparse neighbour graph of Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020, section 3).

Stages, each one request from the server and one reply:

1. :meth:`SecAggClient.advertise`: check the round (cohort, k, t) against the client's
   own :class:`~flwr_guard.secagg.policy.SecAggPolicy`; fresh X25519 keys for share
   encryption and for pairwise masks and a commitment to a fresh graph nonce, signed
   with the client's long-term Ed25519 key over the round context (which includes the
   hash of the model the server will send).
2. :meth:`SecAggClient.receive_roster`: the roster of U1 (every advertiser's id,
   signing key, nonce commitment, keys digest, signature): verify every signature,
   check every key against the federation roster (or the pins), refuse a key under
   two ids; reveal the graph nonce.
3. :meth:`SecAggClient.share_keys`: check every revealed nonce against its
   commitment; the graph seed hashes them all, so no party can choose the graph;
   verify the neighbours' full advertisements against their roster entries,
   Shamir-share the self-mask seed and the mask key among the neighbours, encrypt each
   share for its holder (AES-GCM under an X25519+HKDF key).
4. :meth:`SecAggClient.masked_input`: check the received model against the announced
   hash, decrypt the shares held for neighbours, quantise the update, mask it with the
   self mask and the pairwise masks of the neighbours that shared.
5. :meth:`SecAggClient.consistency`: sign the set of clients whose input is in the
   sum, bound to the roster digest and the graph seed.
6. :meth:`SecAggClient.unmask`: after checking the neighbours' signatures on that set,
   reveal for each neighbour either the share of its self-mask seed (it is in the sum)
   or of its mask key (it dropped) — never both, never below the threshold.

A client that finds anything inconsistent raises :class:`ProtocolError` and sends
nothing more in the round.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.graph import neighbours
from flwr_guard.secagg.messages import (
    MASK_KEY,
    MAX_SHARE_CIPHERTEXT_BYTES,
    SELF_MASK,
    SHARE_PLAINTEXT_BYTES,
    Advertisement,
    RosterEntry,
    pack_roster,
    unpack_roster,
)
from flwr_guard.secagg.policy import PolicyViolation, SecAggPolicy
from flwr_guard.secagg.quantization import quantize
from flwr_guard.secagg.transcripts import (
    commit_nonce,
    commit_self_mask,
    consistency_payload,
    graph_seed,
    pairwise_seed,
    pairwise_sign,
    roster_digest,
    share_aad,
)


def encode_input(
    context: RoundContext,
    update: np.ndarray,
    weight: int,
    metric_values: Sequence[int | float] = (),
    noise: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """The unmasked integer vector of one client: ``weight * quantise(update)`` (+ noise),
    then the masked metrics, then the weight, modulo ``2^modulus_bits``.

    Args:
        context: the round (or session) context: lengths, ranges, modulus.
        update: float array, flattened model update, length ``update_length``.
        weight: integer in ``[1, max_weight]`` (e.g. number of examples).
        metric_values: one integer in ``[0, max_weight]`` per ``masked_metrics`` name.
        noise: optional int64 ``(update_length,)`` added before masking (distributed DP).
        rng: randomness of the stochastic rounding (fresh by default).

    Returns:
        ``(vector, clipped)``: uint32/uint64 of length ``vector_length``; the number of
        coordinates clipped to ``[-r, r]``.

    Raises:
        ValueError: an update of the wrong length or with NaN/Inf, a weight or metric
            out of range, noise of the wrong shape or dtype.
    """
    params = context.params
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
    return vector, clipped


def check_min_inputs(survivors: int, min_inputs: int) -> None:
    """Refuse to sign a survivor set smaller than the client's own floor.

    Raises:
        PolicyViolation: ``survivors < min_inputs`` (with distributed DP the sum would
            hold less noise than this client's share was scaled for).
    """
    if survivors < min_inputs:
        raise PolicyViolation(
            f"only {survivors} inputs are in the sum, this client's noise was scaled for at "
            f"least {min_inputs} contributors (dp-min-contributors): it does not help unmask it"
        )


def count_neighbour_signatures(
    node_id: int,
    neighbour_ids: Sequence[int],
    roster: Mapping[int, RosterEntry],
    active: set[int],
    payload: bytes,
    signatures: Mapping[int, bytes],
) -> int:
    """Verify the consistency signatures of ``node_id``'s neighbours on ``payload``.

    Only neighbours count, never the client itself: with the complete graph two
    different survivor sets can then both pass only if 2t <= k + c - 1 (Bonawitz et
    al., section 4.4), which 2t > k + c excludes. Signatures of non-neighbours are
    skipped (Bell et al.: O(k) verifications).

    Returns:
        the number of neighbours' signatures that verify.

    Raises:
        ProtocolError: a signature from a node that is not active or not in the
            roster, or a neighbour's signature that does not verify.
    """
    valid = 0
    neighbours_set = set(neighbour_ids)
    for signer, signature in signatures.items():
        if signer not in active or signer not in roster:
            raise ProtocolError(f"signature from node {signer}, which is not active")
        if signer not in neighbours_set and signer != node_id:
            continue
        try:
            crypto.verify(roster[signer].signing_key, payload, signature)
        except crypto.CryptoError as err:
            raise ProtocolError(f"consistency signature of node {signer} is invalid") from err
        valid += signer != node_id
    return valid


@dataclass
class SecAggClient:
    """One client's SecAgg+ state for one round; survives process restarts via
    :meth:`to_state` / :meth:`from_state` (Flower starts a ClientApp per message).

    Args:
        node_id: this client's id in the cohort.
        signing_secret: the client's long-term Ed25519 private key (32 raw bytes); a
            federation roster lists its public key.
        policy: what this client accepts whatever the server says
            (:class:`~flwr_guard.secagg.policy.SecAggPolicy`: smallest cohort, k, t,
            corrupt fraction, the federation roster or trust on first use). The
            default refuses every round: it has no roster and no trust on first use.
        trusted_keys: node id -> Ed25519 public key known out of band; a peer whose
            signing key differs is refused.
        pinned_keys: node id -> signing key seen in earlier rounds (trust on first
            use); a peer whose key changed is refused.

    Secrets of the round, and how long they live: the graph nonce until the roster is
    fixed (:meth:`receive_roster` reveals it); the X25519 share-encryption private key
    from :meth:`advertise` until :meth:`share_keys`, which derives the k per-neighbour
    AES keys and erases it; those keys until :meth:`masked_input` has opened the shares
    addressed to this client. The mask key and self-mask seed stay for the round.
    """

    node_id: int
    signing_secret: bytes
    policy: SecAggPolicy = field(default_factory=SecAggPolicy)
    trusted_keys: dict[int, bytes] = field(default_factory=dict)
    pinned_keys: dict[int, bytes] = field(default_factory=dict)
    context: RoundContext | None = None
    encryption_secret: bytes = b""
    share_encryption_keys: dict[int, bytes] = field(default_factory=dict)
    mask_secret: bytes = b""
    self_mask_seed: bytes = b""
    nonce: bytes = b""
    advertisements: dict[int, Advertisement] = field(default_factory=dict)
    roster: dict[int, RosterEntry] = field(default_factory=dict)
    roster_hash: bytes = b""
    seed: bytes = b""
    neighbour_ids: list[int] = field(default_factory=list)
    shared_ids: list[int] = field(default_factory=list)
    held_shares: dict[int, tuple[int, bytes, bytes]] = field(default_factory=dict)
    signed_survivors: list[int] | None = None
    revealed: dict[int, str] = field(default_factory=dict)
    min_inputs: int = 0
    opened_at: float = 0.0
    """Wall clock (``time.time()``, s) of :meth:`advertise`: the round context's opening,
    recorded with it in the node's round ledger (a state without it counts as opened at 0)."""

    # -- stage 1 -------------------------------------------------------------------
    def advertise(self, context: RoundContext) -> Advertisement:
        """Check the round against the policy, generate this round's keys and graph
        nonce, and sign them (with the nonce's commitment) over the round context.

        Raises:
            ProtocolError: this client is not in the cohort, or the round asks for less
                than the policy (:class:`~flwr_guard.secagg.policy.PolicyViolation`).
        """
        if self.node_id not in context.cohort:
            raise ProtocolError(f"node {self.node_id} is not in the announced cohort")
        if self.policy.roster is None and not self.policy.trust_on_first_use:
            raise PolicyViolation(self.policy.no_roster_message())
        self.policy.check_context(context)
        self.context = context
        self.opened_at = time.time()
        self.encryption_secret, encryption_public = crypto.x25519_keypair()
        self.mask_secret, mask_public = crypto.x25519_keypair()
        self.self_mask_seed = crypto.random_secret()
        self.nonce = crypto.random_secret()
        unsigned = Advertisement(
            node_id=self.node_id,
            encryption_key=encryption_public,
            mask_key=mask_public,
            signing_key=crypto.ed25519_public(self.signing_secret),
            self_mask_commitment=commit_self_mask(self.self_mask_seed),
            nonce_commitment=commit_nonce(self.nonce),
            signature=b"",
        )
        signature = crypto.sign(self.signing_secret, unsigned.signed_payload(context.digest()))
        own = dataclasses.replace(unsigned, signature=signature)
        self.advertisements = {self.node_id: own}
        return own

    # -- stage 2 -------------------------------------------------------------------
    def receive_roster(self, roster: Sequence[RosterEntry]) -> bytes:
        """Check U1's roster and reveal this client's graph nonce.

        Every entry's signature is verified (neighbours or not), every signing key is
        checked against the policy (federation roster, trusted or pinned keys), no key
        may appear under two ids, and the cohort of U1 must still meet the policy.
        Keys are pinned only after all of that passed.

        Returns:
            the 32-byte graph nonce committed to in :meth:`advertise`.

        Raises:
            ProtocolError: naming the entry and the check it failed.
        """
        context = self._require_context()
        if self.roster:
            raise ProtocolError("a roster was already received this round")
        digest = context.digest()
        own = self.advertisements.get(self.node_id)
        entries: dict[int, RosterEntry] = {}
        keys: dict[bytes, int] = {}
        for entry in roster:
            if entry.node_id in entries:
                raise ProtocolError(f"node {entry.node_id} advertised twice")
            if entry.node_id not in context.cohort:
                raise ProtocolError(f"node {entry.node_id} is not in the cohort")
            if entry.signing_key in keys:
                raise ProtocolError(
                    f"nodes {keys[entry.signing_key]} and {entry.node_id} sign with the same "
                    "key (one client posing as several: a Sybil cohort)"
                )
            trusted = self.trusted_keys.get(entry.node_id)
            if trusted is not None and trusted != entry.signing_key:
                raise ProtocolError(f"node {entry.node_id} signs with an unexpected key")
            if entry.node_id != self.node_id:
                self.policy.check_member(entry.node_id, entry.signing_key, self.pinned_keys)
            try:
                entry.verify(digest)
            except crypto.CryptoError as err:
                raise ProtocolError(
                    f"roster entry of node {entry.node_id} does not verify under this round's "
                    "context (forged, or signed for another run, round, cohort, parameters "
                    "or model)"
                ) from err
            keys[entry.signing_key] = entry.node_id
            entries[entry.node_id] = entry
        if own is None or entries.get(self.node_id) != RosterEntry.of(own):
            raise ProtocolError("this client's own advertisement is missing or altered")
        self.policy.check_sum_size(len(entries), "clients that advertised: a cohort")
        if len(entries) - 1 < context.params.reconstruction_threshold:
            raise ProtocolError(
                f"{len(entries)} clients advertised: fewer than reconstruction_threshold "
                f"{context.params.reconstruction_threshold} peers"
            )
        self.roster = entries
        self.roster_hash = roster_digest(entries.values())
        self.pinned_keys.update({i: e.signing_key for i, e in entries.items()})
        nonce, self.nonce = self.nonce, b""
        return nonce

    # -- stage 3 -------------------------------------------------------------------
    def verify_graph(
        self, advertisements: Sequence[Advertisement], nonces: Mapping[int, bytes]
    ) -> tuple[bytes, list[int], dict[int, Advertisement]]:
        """Check the revealed graph nonces against their commitments, derive the graph
        and check the neighbours' advertisements against their roster entries.

        Returns:
            ``(graph seed, this client's neighbour ids, id -> advertisement)``.

        Raises:
            ProtocolError: a nonce missing or not matching its commitment, an
                advertisement that differs from its roster entry, a neighbour's
                advertisement missing, or fewer than ``reconstruction_threshold``
                neighbours.
        """
        context = self._require_context()
        digest = context.digest()
        if set(nonces) != set(self.roster):
            raise ProtocolError(
                "graph nonces missing or extra for nodes "
                f"{sorted(set(nonces) ^ set(self.roster))[:5]}: every member of the roster "
                "must reveal (a graph drawn without some could be steered by the server)"
            )
        for node, nonce in nonces.items():
            if not isinstance(nonce, bytes) or commit_nonce(nonce) != self.roster[node].nonce_commitment:
                raise ProtocolError(f"the graph nonce of node {node} does not match its commitment")
        seed = graph_seed(digest, self.roster_hash, nonces)
        graph = neighbours(list(self.roster), context.params.num_shares, seed)
        neighbour_ids = graph[self.node_id]
        own = self.advertisements[self.node_id]
        by_id: dict[int, Advertisement] = {}
        for ad in advertisements:
            if ad.node_id in by_id:
                raise ProtocolError(f"node {ad.node_id} advertised twice")
            if self.roster.get(ad.node_id) != RosterEntry.of(ad):
                raise ProtocolError(f"advertisement of node {ad.node_id} differs from its roster entry")
            by_id[ad.node_id] = ad
        if by_id.get(self.node_id, own) != own:
            raise ProtocolError("this client's own advertisement is missing or altered")
        missing = [peer for peer in neighbour_ids if peer not in by_id]
        if missing:
            raise ProtocolError(f"advertisements of neighbours {missing} are missing")
        threshold = context.params.reconstruction_threshold
        if len(neighbour_ids) < threshold:
            raise ProtocolError(
                f"{len(neighbour_ids)} neighbours, reconstruction threshold {threshold}"
            )
        return seed, neighbour_ids, by_id

    def share_keys(
        self, advertisements: Sequence[Advertisement], nonces: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        """Derive the graph, verify the neighbours' keys, return ``{neighbour id:
        encrypted shares}``.

        Args:
            advertisements: the full advertisements of this client's neighbours (more
                are accepted if they match the roster; only the neighbours' are kept).
            nonces: the revealed graph nonce of every member of U1.

        Raises:
            ProtocolError: a nonce missing or not matching its commitment, an
                advertisement that differs from its roster entry, a neighbour's
                advertisement missing, a key that is not a valid X25519 key, or fewer
                than ``reconstruction_threshold`` neighbours.
        """
        context = self._require_context()
        if context.multi_round:
            raise ProtocolError(
                "share-keys for a multi-round set-up: its keys open a session "
                "(flwr_guard.secagg.session_client), they are never Shamir-shared"
            )
        if not self.roster:
            raise ProtocolError("share-keys before the roster stage")
        if self.seed:
            raise ProtocolError("share-keys was already run this round")
        digest = context.digest()
        seed, neighbour_ids, by_id = self.verify_graph(advertisements, nonces)
        threshold = context.params.reconstruction_threshold
        own = self.advertisements[self.node_id]
        self.seed, self.neighbour_ids = seed, neighbour_ids
        self.advertisements = {self.node_id: own, **{p: by_id[p] for p in self.neighbour_ids}}
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
            try:
                key = crypto.agree(
                    self.encryption_secret, by_id[peer].encryption_key, digest, b"share-encryption"
                )
            except crypto.CryptoError as err:
                raise ProtocolError(f"node {peer} advertised an invalid encryption key") from err
            self.share_encryption_keys[peer] = key
            plaintext = struct.pack(">H", index) + b_share + sk_share
            out[peer] = crypto.encrypt(key, plaintext, share_aad(digest, self.node_id, peer))
        self.encryption_secret = b""  # every key it can give is derived: erase it
        return out

    # -- stage 4 -------------------------------------------------------------------
    def masked_input(
        self,
        shared_ids: list[int],
        ciphertexts: dict[int, bytes],
        update: np.ndarray,
        weight: int,
        received_model_hash: bytes,
        rng: np.random.Generator | None = None,
        metric_values: Sequence[int | float] = (),
        noise: np.ndarray | None = None,
        min_inputs: int = 0,
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
            min_inputs: the fewest inputs this client lets into an unmasked sum (with
                distributed DP: the contributors its noise share was scaled for);
                :meth:`consistency` refuses a smaller survivor set.

        Returns:
            ``(masked, bad_senders, clipped)``: uint32/uint64 vector of length
            ``vector_length``; ids of neighbours whose shares did not decrypt or
            parse (the server excludes them); number of clipped coordinates.

        Raises:
            ProtocolError: the model differs from the announced one, U2 is not a subset
                of the verified cohort, or too few neighbours shared.
            PolicyViolation: U2 holds fewer than the policy's ``C + 1 + h`` (no sum it
                could join would hide this client's input).
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
        # U3 is within U2: no masked input for a sum that could only be too small.
        self.policy.check_sum_size(len(survivors), "clients that shared keys: a largest possible sum")
        active_neighbours = [v for v in self.neighbour_ids if v in survivors]
        if len(active_neighbours) < params.reconstruction_threshold:
            raise ProtocolError(
                f"only {len(active_neighbours)} neighbours shared keys, threshold "
                f"{params.reconstruction_threshold}"
            )
        vector, clipped = encode_input(context, update, weight, metric_values, noise, rng)
        self.min_inputs = int(min_inputs)
        digest = context.digest()
        graph = neighbours(list(self.roster), params.num_shares, self.seed)
        if not isinstance(ciphertexts, Mapping):
            raise ProtocolError("ciphertexts must be a mapping of sender id to bytes")
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
        if not isinstance(blob, bytes) or key is None or len(blob) > MAX_SHARE_CIPHERTEXT_BYTES:
            return None
        try:
            plaintext = crypto.decrypt(key, blob, share_aad(digest, sender, self.node_id))
        except crypto.CryptoError:
            return None
        if len(plaintext) != SHARE_PLAINTEXT_BYTES:
            return None
        (index,) = struct.unpack(">H", plaintext[:2])
        return index, plaintext[2:34], plaintext[34:66]

    # -- stage 5 -------------------------------------------------------------------
    def consistency(self, survivors: list[int]) -> bytes:
        """Sign U3, the clients whose masked input is in the sum.

        Raises:
            ProtocolError: U3 is not within U2, omits this client, is smaller than the
                reconstruction threshold, or differs from a set signed before.
            PolicyViolation: U3 holds fewer than ``C + 1 + h`` inputs (the policy's
                :attr:`~flwr_guard.secagg.policy.SecAggPolicy.min_sum`).
        """
        context = self._require_context()
        u3 = sorted(set(survivors))
        if not set(u3) <= set(self.shared_ids) or self.node_id not in u3:
            raise ProtocolError("the survivor set is not within the clients that shared keys")
        # The server and up to C colluders read off the sum everything but the honest
        # inputs: sign only a sum holding h honest others beyond them.
        self.policy.check_sum_size(len(u3), "a survivor set (the inputs of the sum)")
        if len(u3) < context.params.reconstruction_threshold:
            raise ProtocolError(
                f"{len(u3)} survivors is below the reconstruction threshold "
                f"{context.params.reconstruction_threshold}"
            )
        check_min_inputs(len(u3), self.min_inputs)
        if self.signed_survivors is not None and self.signed_survivors != u3:
            raise ProtocolError("asked to sign a second, different survivor set")
        self.signed_survivors = u3
        return crypto.sign(
            self.signing_secret, consistency_payload(context.digest(), self.roster_hash, self.seed, u3)
        )

    # -- stage 6 -------------------------------------------------------------------
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
        payload = consistency_payload(context.digest(), self.roster_hash, self.seed, sorted(active_set))
        valid = count_neighbour_signatures(
            self.node_id, self.neighbour_ids, self.roster, active_set, payload, signatures
        )
        if valid < params.reconstruction_threshold:
            raise ProtocolError(
                f"{valid} valid consistency signatures from neighbours (its own not "
                f"counted), {params.reconstruction_threshold} needed"
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
            "nonce": self.nonce,
            "roster_hash": self.roster_hash,
            "seed": self.seed,
            "advertisements": [a.to_dict() for a in self.advertisements.values()],
            "roster": pack_roster(self.roster.values()),
            "neighbour_ids": self.neighbour_ids,
            "shared_ids": self.shared_ids,
            "held_shares": [[p, i, b, s] for p, (i, b, s) in self.held_shares.items()],
            "signed_survivors": self.signed_survivors,
            "revealed": [[p, k] for p, k in self.revealed.items()],
            "pinned_keys": [[p, k] for p, k in self.pinned_keys.items()],
            "min_inputs": self.min_inputs,
            "opened_at": self.opened_at,
        }

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        signing_secret: bytes,
        policy: SecAggPolicy | None = None,
        trusted_keys: dict[int, bytes] | None = None,
    ) -> SecAggClient:
        """Inverse of :meth:`to_state` (the state is the node's own storage).

        Raises:
            ProtocolError: the state is not one :meth:`to_state` wrote.
        """
        try:
            client = cls(
                node_id=int(state["node_id"]),
                signing_secret=signing_secret,
                policy=policy or SecAggPolicy(),
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
            client.nonce = state["nonce"]
            client.roster_hash = state["roster_hash"]
            client.seed = state["seed"]
            client.advertisements = {
                a.node_id: a for a in map(Advertisement.from_dict, state["advertisements"])
            }
            client.roster = {e.node_id: e for e in unpack_roster(state["roster"])}
            client.neighbour_ids = [int(i) for i in state["neighbour_ids"]]
            client.shared_ids = [int(i) for i in state["shared_ids"]]
            client.held_shares = {int(p): (int(i), b, s) for p, i, b, s in state["held_shares"]}
            client.signed_survivors = state["signed_survivors"]
            client.revealed = {int(p): str(k) for p, k in state["revealed"]}
            client.min_inputs = int(state.get("min_inputs", 0))
            client.opened_at = float(state.get("opened_at", 0.0))
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"the saved SecAgg+ state is unreadable: {err}") from err
        return client
