"""The server side of SecAgg+ as a state machine (no Flower imports).

The server relays keys and encrypted shares, sums the masked inputs, and removes
the masks with the shares the clients reveal: the self masks of the clients in the
sum, the pairwise masks of the clients that dropped (Bonawitz et al., CCS 2017,
section 4; sparse graph of Bell et al., CCS 2020). It learns the sum of the
surviving clients' weighted, quantised updates and their total weight, nothing else.

Each ``receive_*`` method takes the replies that arrived (missing ones are dropouts)
and returns what to send next. A reply that is malformed excludes its sender, as if
it had dropped; :class:`SecAggAborted` is raised when too few clients remain, and
nothing is released then. Once the masked inputs are in, the server knows whether
every mask it must remove has enough share holders left; if not, it aborts at once,
before the consistency and unmask stages (no shares are revealed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.client import (
    MASK_KEY,
    SELF_MASK,
    Advertisement,
    ProtocolError,
    RosterEntry,
    commit_self_mask,
    graph_seed,
    pairwise_seed,
    pairwise_sign,
)
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.graph import neighbours

logger = logging.getLogger(__name__)


class SecAggAborted(RuntimeError):
    """The round cannot complete (too many dropouts); no aggregate is released."""


@dataclass
class StageStats:
    """Who took part in each stage, and who was excluded for what."""

    sampled: int = 0
    advertised: list[int] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)
    masked: list[int] = field(default_factory=list)
    signed: list[int] = field(default_factory=list)
    unmasked: list[int] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)

    def dropouts(self) -> dict[str, int]:
        """Clients lost at each stage (dropped or excluded)."""
        return {
            "advertise": self.sampled - len(self.advertised),
            "share-keys": len(self.advertised) - len(self.shared),
            "masked-input": len(self.shared) - len(self.masked),
            "consistency": len(self.masked) - len(self.signed),
            "unmask": len(self.signed) - len(self.unmasked),
        }


@dataclass
class SecAggServer:
    """Server state of one SecAgg+ round over ``context``."""

    context: RoundContext
    stats: StageStats = field(default_factory=StageStats)
    advertisements: dict[int, Advertisement] = field(default_factory=dict)
    graph: dict[int, list[int]] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked_sum: np.ndarray | None = None
    signatures: dict[int, bytes] = field(default_factory=dict)
    revealed: dict[int, dict[str, list[tuple[int, bytes]]]] = field(default_factory=dict)
    reported: dict[int, set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats.sampled = len(self.context.cohort)
        self._digest = self.context.digest()
        self._threshold = self.context.params.reconstruction_threshold

    def _exclude(self, node: int, reason: str) -> None:
        logger.warning("SecAgg+: excluding node %s: %s", node, reason)
        self.stats.excluded[node] = reason

    def _require(self, count: int, stage: str) -> None:
        if count < self._threshold or count < 2:
            raise SecAggAborted(
                f"SecAgg+ round aborted at {stage}: {count} clients left, reconstruction "
                f"threshold {self._threshold}; no aggregate released"
            )

    # stage 1 -> 2
    def receive_advertisements(self, replies: Mapping[int, Advertisement]) -> list[Advertisement]:
        """Keep well-formed, well-signed advertisements from cohort members; return U1's.

        What each client of U1 is then sent: :meth:`roster` (all of U1) and
        :meth:`neighbour_advertisements` (its k neighbours').
        """
        for node, ad in replies.items():
            if node not in self.context.cohort or ad.node_id != node:
                self._exclude(node, "advertisement for another node")
                continue
            try:
                ad.to_bytes()  # key, commitment and signature lengths
            except ProtocolError:
                self._exclude(node, "advertisement with malformed fields")
                continue
            try:
                ad.verify(self._digest)
            except crypto.CryptoError:
                self._exclude(node, "advertisement signature does not verify")
                continue
            self.advertisements[node] = ad
        self.stats.advertised = sorted(self.advertisements)
        self._require(len(self.advertisements), "advertise")
        seed = graph_seed(self._digest, list(self.advertisements.values()))
        self.graph = neighbours(list(self.advertisements), self.context.params.num_shares, seed)
        return [self.advertisements[i] for i in self.stats.advertised]

    def roster(self) -> list[RosterEntry]:
        """Id, signing key and signature of every client in U1, in id order: the part of
        the share-keys message that is the same for every client (it fixes the graph).
        Call after :meth:`receive_advertisements`."""
        return [RosterEntry.of(self.advertisements[i]) for i in self.stats.advertised]

    def neighbour_advertisements(self, node: int) -> list[Advertisement]:
        """The full advertisements of ``node``'s neighbours (k of them): the part of the
        share-keys message for ``node`` alone. Call after :meth:`receive_advertisements`."""
        return [self.advertisements[v] for v in self.graph[node]]

    # stage 2 -> 3
    def receive_shares(self, replies: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Check each sender addressed exactly its neighbours; route the ciphertexts.

        Returns:
            recipient id -> {sender id: ciphertext}, for every recipient in U2.
        """
        shared = []
        for sender, ciphertexts in replies.items():
            if sender not in self.advertisements:
                self._exclude(sender, "shares from a node that did not advertise")
                continue
            if sorted(ciphertexts) != self.graph[sender] or not all(
                isinstance(c, bytes) and len(c) > crypto.NONCE_BYTES + crypto.TAG_BYTES
                for c in ciphertexts.values()
            ):
                self._exclude(sender, "malformed share message")
                continue
            shared.append(sender)
        self.stats.shared = sorted(shared)
        self._require(len(shared), "share-keys")
        self.routed = {
            recipient: {
                sender: replies[sender][recipient]
                for sender in self.stats.shared
                if recipient in self.graph[sender]
            }
            for recipient in self.stats.shared
        }
        return self.routed

    # stage 3 -> 4
    def receive_masked_inputs(
        self, replies: Mapping[int, tuple[np.ndarray, list[int]]]
    ) -> list[int]:
        """Sum the well-formed masked vectors; return U3 (whose input is in the sum).

        A sender reported by a neighbour for shares that did not decrypt is excluded
        (treated as dropped: its masks are removed with its mask key).

        Raises:
            SecAggAborted: fewer than ``reconstruction_threshold`` inputs, or the round
                can no longer complete: a client in the sum has fewer than t neighbours
                in the sum (they hold the shares of its self mask), or a client out of
                the sum whose pairwise masks are in it has fewer than t neighbours in
                the sum holding shares of its mask key. Raised before anything is
                asked of the clients again, so no share is revealed.
        """
        dtype = prg.mask_dtype(self.context.params.modulus_bits)
        self.reported = {}
        for node, (_, bads) in replies.items():
            if node in self.stats.shared:
                for bad in bads:
                    self.reported.setdefault(int(bad), set()).add(node)
        reported = set(self.reported)
        accepted: dict[int, np.ndarray] = {}
        for node, (vector, _) in replies.items():
            if node not in self.stats.shared:
                self._exclude(node, "masked input from a node outside U2")
            elif node in reported:
                self._exclude(node, "a neighbour reported its shares as invalid")
            elif (
                not isinstance(vector, np.ndarray)
                or vector.dtype != dtype
                or vector.shape != (self.context.vector_length,)
            ):
                self._exclude(node, f"masked vector of shape {getattr(vector, 'shape', None)}")
            else:
                accepted[node] = vector
        self.stats.masked = sorted(accepted)
        self._require(len(accepted), "masked-input")
        self._require_share_holders()
        total = np.zeros(self.context.vector_length, dtype=dtype)
        for vector in accepted.values():
            total += vector
        self.masked_sum = total
        return self.stats.masked

    def _holders(self, node: int) -> list[int]:
        """The neighbours of ``node`` in U3 that hold its shares (did not report them)."""
        in_sum = set(self.stats.masked)
        return [v for v in self.graph[node] if v in in_sum and v not in self.reported.get(node, ())]

    def _masks_in_sum(self, gone: int) -> bool:
        """Whether a client out of the sum has pairwise masks in it (a neighbour in U3)."""
        return any(v in set(self.stats.masked) for v in self.graph[gone])

    def _require_share_holders(self) -> None:
        """Abort now if some mask in the sum can never be removed (see
        :meth:`receive_masked_inputs`): the outcome is certain, so skip the consistency
        and unmask stages."""
        t = self._threshold
        short: list[str] = []
        for node in self.stats.masked:
            holders = len(self._holders(node))
            if holders < t:
                short.append(f"node {node} is in the sum but only {holders} of its neighbours "
                             "are, too few to remove its self mask")
        for gone in sorted(set(self.stats.shared) - set(self.stats.masked)):
            holders = len(self._holders(gone))
            if self._masks_in_sum(gone) and holders < t:
                short.append(f"node {gone} dropped and only {holders} of its neighbours in the "
                             "sum hold shares of its mask key, too few to remove its pairwise masks")
        if short:
            more = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
            raise SecAggAborted(
                f"SecAgg+ round aborted after masked-input: {short[0]}{more}; reconstruction "
                f"threshold {t}. Consistency and unmask stages skipped: no shares revealed, "
                "no aggregate released"
            )

    # stage 4 -> 5
    def receive_signatures(self, replies: Mapping[int, bytes]) -> tuple[list[int], list[int], dict[int, bytes]]:
        """Keep consistency signatures from U3; return (active, dropped, signatures)."""
        for node, signature in replies.items():
            if node in self.stats.masked and isinstance(signature, bytes):
                self.signatures[node] = signature
        self.stats.signed = sorted(self.signatures)
        self._require(len(self.signatures), "consistency")
        dropped = sorted(set(self.stats.shared) - set(self.stats.masked))
        return self.stats.masked, dropped, dict(self.signatures)

    def unmask_signatures(self, node: int) -> dict[int, bytes]:
        """The consistency signatures ``node`` checks in the unmask stage: its own and
        its neighbours' (a client verifies only those, Bell et al.), O(k) per client.

        Call after :meth:`receive_signatures`.
        """
        wanted = {node, *self.graph.get(node, [])}
        return {signer: sig for signer, sig in self.signatures.items() if signer in wanted}

    # stage 5 -> result
    def receive_unmask(self, replies: Mapping[int, Mapping[int, tuple[str, int, bytes]]]) -> None:
        """Collect revealed shares (only those a client may send: kind matches the
        peer's status, from one of the peer's neighbours)."""
        active, dropped = set(self.stats.masked), set(self.stats.shared) - set(self.stats.masked)
        responders = []
        for node, shares in replies.items():
            if node not in self.signatures:
                continue
            responders.append(node)
            for peer, (kind, index, share) in shares.items():
                expected = SELF_MASK if peer in active else MASK_KEY if peer in dropped else None
                if kind != expected or node not in self.graph.get(peer, []):
                    self._exclude(node, f"unexpected {kind} share of node {peer}")
                    continue
                self.revealed.setdefault(peer, {}).setdefault(kind, []).append((index, share))
        self.stats.unmasked = sorted(responders)
        self._require(len(responders), "unmask")

    def aggregate(self) -> tuple[np.ndarray, int]:
        """Remove the masks and return ``(sums, sum of w_i)``.

        ``sums`` (int64, length ``vector_length - 1``) holds ``sum_i w_i q_i`` (the first
        ``update_length`` values), then the sum of each masked metric.

        Raises:
            SecAggAborted: a secret cannot be reconstructed (too few shares).
        """
        if self.masked_sum is None:
            raise SecAggAborted("no masked inputs")
        params, length = self.context.params, self.context.vector_length
        total = self.masked_sum.copy()
        for node in self.stats.masked:
            seed = self._reconstruct(node, SELF_MASK)
            if commit_self_mask(seed) != self.advertisements[node].self_mask_commitment:
                raise SecAggAborted(
                    f"reconstructed self mask of node {node} does not match its commitment: "
                    "a neighbour revealed a wrong share"
                )
            total -= prg.expand(seed, length, params.modulus_bits)
        for gone in sorted(set(self.stats.shared) - set(self.stats.masked)):
            if not self._masks_in_sum(gone):
                continue  # no neighbour of it is in the sum: none of its masks to remove
            mask_secret = self._reconstruct(gone, MASK_KEY)
            if crypto.x25519_public(mask_secret) != self.advertisements[gone].mask_key:
                raise SecAggAborted(f"reconstructed mask key of node {gone} does not match its keys")
            for peer in self.graph[gone]:
                if peer not in self.stats.masked:
                    continue
                seed = pairwise_seed(mask_secret, self.advertisements[peer].mask_key, self._digest)
                mask = prg.expand(seed, length, params.modulus_bits)
                # The survivor ``peer`` added sign(peer, gone) * mask: take it out.
                if pairwise_sign(peer, gone) > 0:
                    total -= mask
                else:
                    total += mask
        weights = int(total[-1])
        if weights == 0 or weights > len(self.stats.masked) * params.max_weight:
            raise SecAggAborted(f"unmasked total weight {weights} is impossible: masks did not cancel")
        return total[:-1].astype(np.int64), weights

    def _reconstruct(self, node: int, kind: str) -> bytes:
        shares = self.revealed.get(node, {}).get(kind, [])
        try:
            return crypto.combine_shares(shares, self._threshold)
        except crypto.CryptoError as err:
            raise SecAggAborted(
                f"cannot reconstruct the {kind} of node {node}: {len(shares)} shares, "
                f"{self._threshold} needed; no aggregate released"
            ) from err


__all__ = ["ProtocolError", "SecAggAborted", "SecAggServer", "StageStats"]
