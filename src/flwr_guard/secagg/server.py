"""The server side of SecAgg+ as a state machine (no Flower imports).

The server relays keys and encrypted shares, sums the masked inputs, and removes
the masks with the shares the clients reveal: the self masks of the clients in the
sum, the pairwise masks of the clients that dropped (Bonawitz et al., CCS 2017,
section 4; sparse graph of Bell et al., CCS 2020). It learns the sum of the
surviving clients' weighted, quantised updates and their total weight, nothing else.

Each ``receive_*`` method takes the replies that arrived (missing ones are dropouts)
and returns what to send next. Every field of every reply is type-, size- and
range-checked before use; a reply that is malformed or does not verify excludes its
sender (logged with the reason), as if it had dropped; :class:`SecAggAborted` is
raised when too few clients remain, and nothing is released then. One misbehaving
client does not sink the round: a consistency signature that does not verify is
dropped, not forwarded; bad-sender reports are weighed against each other
(:meth:`SecAggServer.receive_masked_inputs`); a wrong revealed share is found by
checking reconstructions against the commitments and public keys of the
advertisements, the round is completed from other shares and the revealer excluded. Once
the masked inputs are in, the server knows whether
every mask it must remove has enough share holders left; if not, it aborts at once,
before the consistency and unmask stages (no shares are revealed).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from flwr_guard.errors import FlwrGuardError
from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.constants import Stage
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.graph import neighbours
from flwr_guard.secagg.messages import MASK_KEY, MAX_SHARE_CIPHERTEXT_BYTES, SELF_MASK, Advertisement, RosterEntry
from flwr_guard.secagg.transcripts import (
    commit_nonce,
    commit_self_mask,
    consistency_payload,
    graph_seed,
    pairwise_seed,
    pairwise_sign,
    roster_digest,
)

logger = logging.getLogger(__name__)


class SecAggAborted(FlwrGuardError, RuntimeError):
    """The round cannot complete (too many dropouts); no aggregate is released."""


class NonceWithheld(SecAggAborted):
    """Members of U1 did not reveal the graph nonce they committed to (silent or
    malformed at the roster stage). No share exists yet: the strategy runs a fresh
    set-up (new keys, new nonces) with the members that did reveal
    (:attr:`revealed`), leaving the others out of the graph.

    Attributes:
        withheld: ids that did not reveal a matching nonce.
        revealed: ids that did.
    """

    def __init__(self, message: str, withheld: list[int], revealed: list[int]) -> None:
        super().__init__(message)
        self.withheld = withheld
        self.revealed = revealed


MAX_ZERO_COORDINATES = 8
"""A masked vector is uniform modulo 2^b (b >= 32): more than this many zero
coordinates (probability below C(L, 9) 2^-288 for an honest vector of length L) is no
masked vector (e.g. an all-zero one); its sender is excluded before the sum."""


def implausible_masked_vectors(vectors: Mapping[int, np.ndarray]) -> dict[int, str]:
    """Senders whose masked vector cannot be an honest one, with the reason: too many
    zero coordinates (:data:`MAX_ZERO_COORDINATES`), or the same bytes as another
    sender's vector (a replay; both are left out, as which one copied is unknowable).

    A well-formed but otherwise wrong vector (uniform garbage) is not detectable without
    the clients' secrets: the masks then do not cancel and the round releases nothing
    (the total-weight check of ``aggregate``)."""
    out: dict[int, str] = {}
    seen: dict[bytes, list[int]] = {}  # first values -> senders (honest ones never collide)
    for node, vector in vectors.items():
        zeros = int(np.count_nonzero(vector == 0))
        if zeros > MAX_ZERO_COORDINATES:
            out[node] = (f"masked vector with {zeros} zero coordinates (a masked vector is "
                         "uniform): not masked")
            continue
        prefix = vector[:16].tobytes()
        for other in seen.get(prefix, []):
            if np.array_equal(vectors[other], vector):
                out[node] = f"masked vector identical to node {other}'s (a replay)"
                out.setdefault(other, f"masked vector identical to node {node}'s (a replay)")
        seen.setdefault(prefix, []).append(node)
    return out


@dataclass
class StageStats:
    """Who took part in each stage, and who was excluded for what."""

    sampled: int = 0
    advertised: list[int] = field(default_factory=list)
    revealed: list[int] = field(default_factory=list)
    shared: list[int] = field(default_factory=list)
    masked: list[int] = field(default_factory=list)
    signed: list[int] = field(default_factory=list)
    unmasked: list[int] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)

    def dropouts(self) -> dict[str, int]:
        """Clients lost at each stage (dropped or excluded)."""
        return {
            Stage.ADVERTISE: self.sampled - len(self.advertised),
            Stage.ROSTER: len(self.advertised) - len(self.revealed or self.advertised),
            Stage.SHARE_KEYS: len(self.revealed) - len(self.shared) if self.revealed else 0,
            Stage.MASKED_INPUT: len(self.shared) - len(self.masked),
            Stage.CONSISTENCY: len(self.masked) - len(self.signed),
            Stage.UNMASK: len(self.signed) - len(self.unmasked),
        }


def exclude(stats: StageStats, node: int, reason: str) -> None:
    """Log that ``node`` leaves the round and keep its first reason in ``stats``."""
    logger.warning("SecAgg+: excluding node %s: %s", node, reason)
    stats.excluded.setdefault(node, reason)


def require_survivors(count: int, threshold: int, stage: str) -> None:
    """Raise unless ``count`` clients, at least ``threshold`` and 2, remain at ``stage``.

    Raises:
        SecAggAborted: too few left; no aggregate is released.
    """
    if count < threshold or count < 2:
        raise SecAggAborted(
            f"SecAgg+ round aborted at {stage}: {count} clients left, reconstruction "
            f"threshold {threshold}; no aggregate released"
        )


@dataclass
class SecAggServer:
    """Server state of one SecAgg+ round over ``context``."""

    context: RoundContext
    stats: StageStats = field(default_factory=StageStats)
    advertisements: dict[int, Advertisement] = field(default_factory=dict)
    nonces: dict[int, bytes] = field(default_factory=dict)
    roster_hash: bytes = b""
    seed: bytes = b""
    graph: dict[int, list[int]] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked_sum: np.ndarray | None = None
    signatures: dict[int, bytes] = field(default_factory=dict)
    # peer -> kind -> [(share index, share, revealer)]
    revealed: dict[int, dict[str, list[tuple[int, bytes, int]]]] = field(default_factory=dict)
    reported: dict[int, set[int]] = field(default_factory=dict)
    max_reconstruction_attempts: int = 64

    def __post_init__(self) -> None:
        self.stats.sampled = len(self.context.cohort)
        self._digest = self.context.digest()
        self._threshold = self.context.params.reconstruction_threshold

    def _exclude(self, node: int, reason: str) -> None:
        exclude(self.stats, node, reason)

    def _require(self, count: int, stage: str) -> None:
        require_survivors(count, self._threshold, stage)

    # stage 1 -> 2
    def receive_advertisements(self, replies: Mapping[int, Advertisement]) -> list[RosterEntry]:
        """Keep well-formed, well-signed advertisements from cohort members, one per
        signing key; return U1's roster (sent to every client of U1)."""
        by_key: dict[bytes, int] = {}
        for node, ad in replies.items():
            if node not in self.context.cohort or not isinstance(ad, Advertisement) or ad.node_id != node:
                self._exclude(node, "advertisement for another node")
                continue
            try:
                ad.to_bytes()  # id range, key, commitment and signature lengths
            except ProtocolError:
                self._exclude(node, "advertisement with malformed fields")
                continue
            try:
                ad.verify(self._digest)
            except crypto.CryptoError:
                self._exclude(node, "advertisement signature does not verify")
                continue
            if not (crypto.valid_x25519_public(ad.encryption_key)
                    and crypto.valid_x25519_public(ad.mask_key)):
                # Every neighbour would refuse it (a low-order point): out before the roster.
                self._exclude(node, "advertised an invalid X25519 key")
                continue
            if ad.signing_key in by_key:
                # Honest clients refuse a roster with one key under two ids (a Sybil).
                self._exclude(node, f"signs with the key of node {by_key[ad.signing_key]}")
                continue
            by_key[ad.signing_key] = node
            self.advertisements[node] = ad
        self.stats.advertised = sorted(self.advertisements)
        self._require(len(self.advertisements), Stage.ADVERTISE)
        self.roster_hash = roster_digest(self.roster())
        return self.roster()

    def roster(self) -> list[RosterEntry]:
        """Id, signing key, nonce commitment, keys digest and signature of every client
        in U1, in id order. Call after :meth:`receive_advertisements`."""
        return [RosterEntry.of(self.advertisements[i]) for i in self.stats.advertised]

    # stage 2 -> 3
    def receive_nonces(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Check each revealed graph nonce against its commitment; derive the graph.

        Returns:
            node id -> nonce, for all of U1 (every client gets all of them).

        Raises:
            NonceWithheld: a member of U1 did not reveal, or revealed another nonce.
                The graph would otherwise depend on whose reveal the server keeps,
                which is a choice the server must not have; this set-up ends before
                any share exists (the strategy starts a fresh one without them).
        """
        bad: list[int] = []
        for node in self.stats.advertised:
            nonce = replies.get(node)
            if not isinstance(nonce, bytes) or commit_nonce(nonce) != self.advertisements[node].nonce_commitment:
                bad.append(node)
                self._exclude(node, "did not reveal the graph nonce it committed to "
                              f"({'no reply' if node not in replies else 'another nonce'})")
            else:
                self.nonces[node] = nonce
        self.stats.revealed = sorted(self.nonces)
        if bad:
            raise NonceWithheld(
                f"SecAgg+ set-up stopped at the roster stage: nodes {bad[:5]} did not reveal "
                "the graph nonce they committed to; the graph must hash every member's "
                "nonce. No share was sent, nothing is released",
                bad, list(self.stats.revealed),
            )
        self.seed = graph_seed(self._digest, self.roster_hash, self.nonces)
        self.graph = neighbours(list(self.advertisements), self.context.params.num_shares, self.seed)
        return dict(self.nonces)

    def neighbour_advertisements(self, node: int) -> list[Advertisement]:
        """The full advertisements of ``node``'s neighbours (k of them): the part of the
        share-keys message for ``node`` alone. Call after :meth:`receive_nonces`."""
        return [self.advertisements[v] for v in self.graph[node]]

    # stage 3 -> 4
    def receive_shares(self, replies: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Check each sender addressed exactly its neighbours with ciphertexts of the
        one valid size; route them.

        Returns:
            recipient id -> {sender id: ciphertext}, for every recipient in U2.
        """
        shared = []
        for sender, ciphertexts in replies.items():
            if sender not in self.advertisements or not self.graph:
                self._exclude(sender, "shares from a node that did not advertise")
                continue
            if (
                not isinstance(ciphertexts, Mapping)
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in ciphertexts)
                or sorted(ciphertexts) != self.graph[sender]
                or not all(
                    isinstance(c, bytes) and len(c) == MAX_SHARE_CIPHERTEXT_BYTES
                    for c in ciphertexts.values()
                )
            ):
                self._exclude(sender, "malformed share message")
                continue
            shared.append(sender)
        self.stats.shared = sorted(shared)
        self._require(len(shared), Stage.SHARE_KEYS)
        self.routed = {
            recipient: {
                sender: replies[sender][recipient]
                for sender in self.stats.shared
                if recipient in self.graph[sender]
            }
            for recipient in self.stats.shared
        }
        return self.routed

    # stage 4 -> 5
    def receive_masked_inputs(
        self, replies: Mapping[int, tuple[np.ndarray, list[int]]]
    ) -> list[int]:
        """Sum the well-formed masked vectors; return U3 (whose input is in the sum).

        Bad-sender reports (a neighbour's shares did not decrypt) are weighed before
        acting on them: only reports about a neighbour that routed shares to the
        reporter count; then, repeatedly, the node in the most open reports (as
        reporter or reported) is excluded, until none is left: a client that falsely
        reports all its neighbours is excluded itself, a client that sent bad shares to
        several neighbours is excluded by their reports, and a single disputed pair
        excludes both (one of the two misbehaved; which is undecidable without the
        decryption key). Excluded senders are treated as dropped (their masks are
        removed with their mask key); reported shares are never used.

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
        edges: set[tuple[int, int]] = set()
        candidates: dict[int, np.ndarray] = {}
        for node, reply in replies.items():
            if node not in self.stats.shared:
                self._exclude(node, "masked input from a node outside U2")
                continue
            try:
                vector, bads = reply
            except (TypeError, ValueError):
                self._exclude(node, "malformed masked-input reply")
                continue
            if (
                not isinstance(vector, np.ndarray)
                or vector.dtype != dtype
                or vector.shape != (self.context.vector_length,)
            ):
                self._exclude(node, f"masked vector of shape {getattr(vector, 'shape', None)}")
                continue
            if not isinstance(bads, (list, tuple)) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in bads
            ):
                self._exclude(node, "malformed bad-sender report")
                continue
            for bad in set(bads):
                if bad not in self.routed.get(node, {}):
                    # Not a sender of shares to it: the report is noise, ignore it.
                    logger.warning("SecAgg+: node %s reported %s, which sent it no shares", node, bad)
                    continue
                self.reported.setdefault(bad, set()).add(node)
                edges.add((node, bad))
            candidates[node] = vector
        for node, reason in implausible_masked_vectors(candidates).items():
            self._exclude(node, reason)
            candidates.pop(node, None)
        # Reports about a node out of the sum only discount the reporter as a holder
        # of its shares (``_holders``); a dispute between two nodes in the sum needs a
        # decision.
        disputed = {(a, b) for a, b in edges if a in candidates and b in candidates}
        for node, reason in self._resolve_reports(disputed).items():
            self._exclude(node, reason)
            candidates.pop(node, None)
        self.stats.masked = sorted(candidates)
        self._require(len(candidates), Stage.MASKED_INPUT)
        self._require_share_holders()
        total = np.zeros(self.context.vector_length, dtype=dtype)
        for vector in candidates.values():
            total += vector
        self.masked_sum = total
        return self.stats.masked

    @staticmethod
    def _resolve_reports(edges: set[tuple[int, int]]) -> dict[int, str]:
        """Greedy cover of the report graph (reporter, reported): see
        :meth:`receive_masked_inputs`."""
        excluded: dict[int, str] = {}
        open_edges = set(edges)
        while open_edges:
            degree: dict[int, int] = {}
            for a, b in open_edges:
                degree[a] = degree.get(a, 0) + 1
                degree[b] = degree.get(b, 0) + 1
            top = max(degree.values())
            if top == 1:  # disjoint disputed pairs: exclude both ends of each
                for a, b in sorted(open_edges):
                    excluded[a] = f"disputed shares with node {b} (reported it)"
                    excluded[b] = f"disputed shares with node {a} (reported by it)"
                break
            node = min(n for n, d in degree.items() if d == top)
            as_reporter = sum(1 for a, _ in open_edges if a == node)
            excluded[node] = (
                f"in {top} bad-share reports ({as_reporter} made by it, "
                f"{top - as_reporter} about it)"
            )
            open_edges = {(a, b) for a, b in open_edges if node not in (a, b)}
        return excluded

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

    # stage 5 -> 6
    def receive_signatures(self, replies: Mapping[int, bytes]) -> tuple[list[int], list[int], dict[int, bytes]]:
        """Keep the consistency signatures from U3 that verify (under the signer's
        advertised key, on U3 bound to the roster digest and graph seed); one that does
        not is excluded, not forwarded. Return (active, dropped, signatures)."""
        payload = consistency_payload(self._digest, self.roster_hash, self.seed, self.stats.masked)
        self.signatures.update(verified_signatures(
            replies, self.stats.masked, self.advertisements, payload, self._exclude))
        self.stats.signed = sorted(self.signatures)
        self._require(len(self.signatures), Stage.CONSISTENCY)
        dropped = sorted(set(self.stats.shared) - set(self.stats.masked))
        return self.stats.masked, dropped, dict(self.signatures)

    def unmask_signatures(self, node: int) -> dict[int, bytes]:
        """The consistency signatures ``node`` checks in the unmask stage: its own and
        its neighbours' (a client verifies only those, Bell et al.), O(k) per client.

        Call after :meth:`receive_signatures`.
        """
        wanted = {node, *self.graph.get(node, [])}
        return {signer: sig for signer, sig in self.signatures.items() if signer in wanted}

    # stage 6 -> result
    def receive_unmask(self, replies: Mapping[int, Mapping[int, tuple[str, int, bytes]]]) -> None:
        """Collect revealed shares: only those a client may send (kind matches the
        peer's status, from one of the peer's neighbours, at the share index the graph
        gives that neighbour, 32 bytes). A reply with any other share is dropped whole
        and its sender excluded."""
        active, dropped = set(self.stats.masked), set(self.stats.shared) - set(self.stats.masked)
        responders = []
        for node, shares in replies.items():
            if node not in self.signatures:
                continue
            problem = None if isinstance(shares, Mapping) else "an unmask reply that is not a mapping"
            accepted: list[tuple[int, str, int, bytes]] = []
            for peer, item in (shares.items() if problem is None else ()):
                expected = SELF_MASK if peer in active else MASK_KEY if peer in dropped else None
                try:
                    kind, index, share = item
                except (TypeError, ValueError):
                    problem = f"a malformed share of node {peer}"
                    break
                neighbours_of_peer = self.graph.get(peer, [])
                if (
                    kind != expected
                    or node not in neighbours_of_peer
                    or not isinstance(share, bytes)
                    or len(share) != crypto.SECRET_BYTES
                    or index != neighbours_of_peer.index(node) + 1
                ):
                    problem = f"an unexpected {kind!r} share of node {peer}"
                    break
                accepted.append((peer, kind, index, share))
            if problem is not None:
                self._exclude(node, f"revealed {problem}")
                continue
            responders.append(node)
            for peer, kind, index, share in accepted:
                self.revealed.setdefault(peer, {}).setdefault(kind, []).append((index, share, node))
        self.stats.unmasked = sorted(responders)
        self._require(len(responders), Stage.UNMASK)

    def aggregate(self) -> tuple[np.ndarray, int]:
        """Remove the masks and return ``(sums, sum of w_i)``.

        ``sums`` (int64, length ``vector_length - 1``) holds ``sum_i w_i q_i`` (the first
        ``update_length`` values), then the sum of each masked metric.

        Raises:
            SecAggAborted: a secret cannot be reconstructed from any subset of the
                revealed shares (too few, or too many wrong ones).
        """
        if self.masked_sum is None:
            raise SecAggAborted("no masked inputs")
        params, length = self.context.params, self.context.vector_length
        total = self.masked_sum.copy()
        for node in self.stats.masked:
            commitment = self.advertisements[node].self_mask_commitment
            seed = self._reconstruct(node, SELF_MASK, lambda s, c=commitment: commit_self_mask(s) == c)
            total -= prg.expand(seed, length, params.modulus_bits)
        for gone in sorted(set(self.stats.shared) - set(self.stats.masked)):
            if not self._masks_in_sum(gone):
                continue  # no neighbour of it is in the sum: none of its masks to remove
            public = self.advertisements[gone].mask_key
            mask_secret = self._reconstruct(
                gone, MASK_KEY, lambda s, p=public: crypto.x25519_public(s) == p
            )
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

    def _reconstruct(self, node: int, kind: str, check) -> bytes:
        """The secret of ``kind`` of ``node`` from the revealed shares (see
        :func:`reconstruct_secret`)."""
        return reconstruct_secret(
            self.revealed.get(node, {}).get(kind, []), self._threshold, check,
            lambda revealer: self._exclude(revealer, f"revealed a wrong {kind} share of node {node}"),
            f"the {kind} of node {node}",
            "commitment" if kind == SELF_MASK else "public key",
            self.max_reconstruction_attempts, node,
        )


def verified_signatures(
    replies: Mapping[int, object],
    signers: list[int],
    advertisements: Mapping[int, Advertisement],
    payload: bytes,
    exclude: Callable[[int, str], None],
) -> dict[int, bytes]:
    """The consistency signatures of ``signers`` on ``payload`` that verify under their
    advertised signing keys; a signature that does not is excluded, never forwarded."""
    members, out = set(signers), {}
    for node, signature in replies.items():
        if node not in members:
            continue
        try:
            if not isinstance(signature, bytes) or len(signature) != 64:
                raise crypto.CryptoError("malformed")
            crypto.verify(advertisements[node].signing_key, payload, signature)
        except crypto.CryptoError:
            exclude(node, "consistency signature does not verify (not forwarded)")
            continue
        out[node] = signature
    return out


def reconstruct_secret(
    revealed: list[tuple[int, bytes, int]],
    t: int,
    check: Callable[[bytes], bool],
    exclude: Callable[[int], None],
    what: str,
    checked_against: str,
    max_attempts: int = 64,
    rng_seed: int = 0,
) -> bytes:
    """A Shamir-shared secret from t revealed shares that pass ``check`` (a commitment
    or public key the owner published before).

    Args:
        revealed: ``(share index, 32-byte share, revealer id)`` triples.
        t: the reconstruction threshold.
        check: whether a candidate secret is the right one.
        exclude: called with the id of each revealer whose share gives another secret.
        what, checked_against: for the error message.

    First the first t shares (the honest case: one combination); if they fail, subsets
    leaving out one share, then random subsets (at most ``max_attempts``). Once such a
    subset passes, every other share is tested with t - 1 of the good ones; a revealer
    whose share gives another secret is excluded.

    Raises:
        SecAggAborted: fewer than t shares, or no subset tried passes.
    """
    unique: dict[int, tuple[bytes, int]] = {}
    for index, share, revealer in revealed:
        unique.setdefault(index, (share, revealer))
    items = sorted(unique.items())
    if len(items) < t:
        raise SecAggAborted(
            f"cannot reconstruct {what}: {len(items)} shares, {t} needed; no aggregate released"
        )

    def attempt(subset) -> bytes | None:
        try:
            secret = crypto.combine_shares([(i, s) for i, (s, _) in subset], t)
            return secret if check(secret) else None
        except (crypto.CryptoError, ValueError):
            return None

    rng = random.Random(rng_seed)
    candidates = itertools.chain(
        [items[:t]],
        ([x for j, x in enumerate(items) if j != skip][:t] for skip in range(min(t, len(items)))),
        (rng.sample(items, t) for _ in range(max_attempts)),
    )
    for tried, subset in enumerate(itertools.islice(candidates, max_attempts + len(items) + 1)):
        secret = attempt(subset)
        if secret is None:
            continue
        if tried == 0:
            return secret  # the first t shares are right (the honest case): done
        good = {i for i, _ in subset}
        base = list(subset)[: t - 1]
        for index, (share, revealer) in items:
            if index not in good and attempt([*base, (index, (share, revealer))]) is None:
                exclude(revealer)
        return secret
    raise SecAggAborted(
        f"cannot reconstruct {what}: no subset of the {len(items)} revealed shares matches "
        f"its advertised {checked_against} (wrong shares); no aggregate released"
    )

__all__ = ["NonceWithheld", "ProtocolError", "SecAggAborted", "SecAggServer", "StageStats", "reconstruct_secret"]
