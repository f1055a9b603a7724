"""Multi-round SecAgg+, the server side: a session opened from a set-up, then three
messages per round (no Flower imports).

:class:`SessionServer` is the server of the protocol that
:mod:`flwr_guard.secagg.session_client` describes (stages 4 to 6 of each round): it
checks and sums the round's masked inputs, keeps the consistency signatures that
verify, routes to each client the signatures it checks and the shares it holds, and
removes the masks from what the clients reveal. Like
:class:`~flwr_guard.secagg.server.SecAggServer` it excludes a sender whose reply is
malformed or does not verify (logged with the reason) and raises
:class:`~flwr_guard.secagg.server.SecAggAborted` when too few clients remain; nothing
is released then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.constants import Stage
from flwr_guard.secagg.messages import (
    ROUND_SHARE_CIPHERTEXT_BYTES,
    CulpritEvidence,
    RoundInput,
    RoundReveal,
)
from flwr_guard.secagg.server import (
    SecAggAborted,
    SecAggServer,
    StageStats,
    exclude,
    implausible_masked_vectors,
    reconstruct_secret,
    require_survivors,
    verified_signatures,
)
from flwr_guard.secagg.transcripts import (
    SessionRound,
    commit_pair_seed,
    commit_self_mask,
    pairwise_sign,
    session_consistency_payload,
    session_digest,
    session_input_payload,
    session_reveal_payload,
    wrong_pair_seeds,
)

logger = logging.getLogger(__name__)


@dataclass
class RoundStats(StageStats):
    """Who took part in a session round: ``sampled`` asked, ``masked`` in the sum,
    ``signed``, ``unmasked``; ``excluded`` with reasons."""

    def dropouts(self) -> dict[str, int]:
        return {
            Stage.MASKED_INPUT: self.sampled - len(self.masked),
            Stage.CONSISTENCY: len(self.masked) - len(self.signed),
            Stage.UNMASK: len(self.signed) - len(self.unmasked),
        }


class SessionServer:
    """Server state of a multi-round session, opened from a set-up's
    :class:`~flwr_guard.secagg.server.SecAggServer` after :meth:`receive_nonces`.

    The session's cohort is U1 of the set-up (every member that revealed its nonce);
    a round may ask any subset of it (the others count as dropped for that round).
    """

    def __init__(self, setup: SecAggServer) -> None:
        if not setup.context.multi_round or not setup.graph:
            raise ValueError("a session opens from a multi-round set-up past its roster stage")
        self.context = setup.context
        self.advertisements = dict(setup.advertisements)
        self.nonces = dict(setup.nonces)
        self.roster_hash, self.seed, self.graph = setup.roster_hash, setup.seed, dict(setup.graph)
        self.cohort = sorted(self.advertisements)
        self.digest = session_digest(self.context, self.roster_hash)
        self.opened: set[int] = set()  # nodes that took part in a round (session open there)
        self.rounds = 0
        self._threshold = self.context.params.reconstruction_threshold
        self.max_reconstruction_attempts = 64
        self.start_round(0, b"\0" * 32, [])

    def open_payload(self, node: int) -> dict[str, Any]:
        """What ``node`` needs to open the session: every nonce, its neighbours' ads."""
        return {"nonces": self.nonces, "advertisements": [self.advertisements[v] for v in self.graph[node]]}

    # -- one round --------------------------------------------------------------------
    def start_round(self, server_round: int, model_hash: bytes, asked: Sequence[int]) -> None:
        """Reset the per-round state for ``server_round`` (the model sent to all)."""
        self.server_round = server_round
        self.round_digest = SessionRound(self.digest, server_round, model_hash).digest()
        self.stats = RoundStats(sampled=len(asked))
        self.commitments: dict[int, bytes] = {}
        self.pair_commitments: dict[int, dict[int, bytes]] = {}
        self.culprits: dict[int, str] = {}  # provably misbehaved this round
        self.ciphertexts: dict[int, dict[int, bytes]] = {}
        self.masked_sum: np.ndarray | None = None
        self.vectors: dict[int, np.ndarray] = {}
        self.signatures: dict[int, bytes] = {}
        self.reveals: dict[int, RoundReveal] = {}
        self.input_signatures: dict[int, bytes] = {}
        self.evidence: dict[int, CulpritEvidence] = {}  # culprit -> its signed statements
        self.recovery_needed: dict[int, list[int]] = {}  # neighbour -> culprits it is asked about
        self.recovered: dict[int, dict[int, bytes]] = {}  # neighbour -> culprit -> pair seed
        self.removed: set[int] = set()  # culprits whose input is taken out of the sum
        self.summed: list[int] = []  # whose inputs the released aggregate holds

    def _exclude(self, node: int, reason: str) -> None:
        exclude(self.stats, node, reason)  # the same log and stats as SecAggServer

    def _require(self, count: int, stage: str) -> None:
        require_survivors(count, self._threshold, stage)

    def receive_masked_inputs(self, replies: Mapping[int, Any]) -> list[int]:
        """Check and sum the round's inputs; return U3.

        A reply must be a :class:`RoundInput` from a session member with a vector of
        the session's dtype and length, a 32-byte commitment, one ciphertext of the
        one valid size and one 32-byte pair-seed commitment per neighbour, and the
        sender's valid signature of its commitments over this round's digest
        (:func:`~flwr_guard.secagg.transcripts.session_input_payload`, under the key of
        its set-up advertisement). Members with fewer than t neighbours in the sum
        are dropped from it (they could not check the consistency signatures), until
        every member of U3 has t.

        Raises:
            SecAggAborted: fewer than t inputs left.
        """
        self.rounds += 1
        dtype = prg.mask_dtype(self.context.params.modulus_bits)
        for node, reply in replies.items():
            if node not in self.graph:
                self._exclude(node, "input from a node outside the session")
                continue
            if (
                not isinstance(reply, RoundInput)
                or not isinstance(reply.vector, np.ndarray)
                or reply.vector.dtype != dtype
                or reply.vector.shape != (self.context.vector_length,)
                or not isinstance(reply.self_mask_commitment, bytes)
                or len(reply.self_mask_commitment) != 32
                or not isinstance(reply.ciphertexts, Mapping)
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in reply.ciphertexts)
                or sorted(reply.ciphertexts) != self.graph[node]
                or not all(isinstance(c, bytes) and len(c) == ROUND_SHARE_CIPHERTEXT_BYTES
                           for c in reply.ciphertexts.values())
            ):
                self._exclude(node, "malformed session input")
                continue
            if not isinstance(reply.pair_commitments, Mapping) or (
                    not all(isinstance(p, int) and not isinstance(p, bool) for p in reply.pair_commitments)
                    or sorted(reply.pair_commitments) != self.graph[node]
                    or not all(isinstance(c, bytes) and len(c) == 32
                               for c in reply.pair_commitments.values())):
                self._exclude(node, "malformed pair-seed commitments")
                continue
            try:
                crypto.verify(self.advertisements[node].signing_key, session_input_payload(
                    self.round_digest, node, reply.self_mask_commitment, reply.pair_commitments),
                    reply.signature)
            except (crypto.CryptoError, TypeError):
                self._exclude(node, "its signature of its input's commitments does not verify")
                continue
            self.input_signatures[node] = reply.signature
            self.pair_commitments[node] = dict(reply.pair_commitments)
            self.vectors[node] = reply.vector
            self.commitments[node] = reply.self_mask_commitment
            self.ciphertexts[node] = dict(reply.ciphertexts)
        for node, reason in implausible_masked_vectors(self.vectors).items():
            self._exclude(node, reason)
            del self.vectors[node]
        members = set(self.vectors)
        while True:
            short = {u for u in members if sum(v in members for v in self.graph[u]) < self._threshold}
            if not short:
                break
            for u in short:
                self._exclude(u, "fewer than t of its neighbours sent an input this round")
            members -= short
        self.stats.masked = sorted(members)
        self.opened.update(members)
        self._require(len(members), Stage.MASKED_INPUT)
        total = np.zeros(self.context.vector_length, dtype=dtype)
        for node in members:
            total += self.vectors[node]
        self.masked_sum = total
        return self.stats.masked

    def receive_signatures(self, replies: Mapping[int, bytes]) -> list[int]:
        """Keep the consistency signatures of U3 that verify; return the signers."""
        payload = session_consistency_payload(self.round_digest, self.roster_hash, self.seed, self.stats.masked)
        self.signatures.update(verified_signatures(
            replies, self.stats.masked, self.advertisements, payload, self._exclude))
        self.stats.signed = sorted(self.signatures)
        self._require(len(self.signatures), Stage.CONSISTENCY)
        return self.stats.signed

    def unmask_request(self, node: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """For ``node``: the signatures it checks (its own and its neighbours') and the
        shares of its active neighbours' seeds encrypted for it."""
        wanted = {node, *self.graph[node]}
        signatures = {s: sig for s, sig in self.signatures.items() if s in wanted}
        active = set(self.stats.masked)
        routed = {s: self.ciphertexts[s][node] for s in self.graph[node] if s in active}
        return signatures, routed

    def receive_unmask(self, replies: Mapping[int, Any]) -> None:
        """Keep the reveals that have exactly the expected shape: a 32-byte seed, shares
        only of active neighbours at their graph index, pair seeds for exactly the
        neighbours out of U3. Any other reply is dropped whole, its sender excluded."""
        active = set(self.stats.masked)
        for node, reveal in replies.items():
            if node not in self.signatures:
                continue
            out_of_sum = {v for v in self.graph[node] if v not in active}
            ok = (
                isinstance(reveal, RoundReveal)
                and isinstance(reveal.self_mask_seed, bytes)
                and len(reveal.self_mask_seed) == crypto.SECRET_BYTES
                and isinstance(reveal.pair_seeds, Mapping)
                and set(reveal.pair_seeds) == out_of_sum
                and all(isinstance(s, bytes) and len(s) == crypto.SECRET_BYTES for s in reveal.pair_seeds.values())
                and isinstance(reveal.shares, Mapping)
                and all(
                    peer in active and node in self.graph[peer]
                    and isinstance(item, tuple) and len(item) == 2
                    and item[0] == self.graph[peer].index(node) + 1
                    and isinstance(item[1], bytes) and len(item[1]) == crypto.SECRET_BYTES
                    for peer, item in reveal.shares.items()
                )
            )
            if not ok:
                self._exclude(node, "revealed an unexpected or malformed share or seed")
                continue
            committed = self.pair_commitments.get(node) or {}
            wrong = wrong_pair_seeds(committed, reveal.pair_seeds)
            if wrong:
                # (The reveal's signature is checked only here, where it is the proof:
                # a reveal whose seeds all match needs none.)
                try:
                    crypto.verify(self.advertisements[node].signing_key, session_reveal_payload(
                        self.round_digest, node, reveal.pair_seeds), reveal.signature)
                except (crypto.CryptoError, TypeError):
                    self._exclude(node, f"revealed a pair seed for node {wrong[0]} that does not match "
                                        "its own commitment, in a reveal whose signature does not verify "
                                        "(no proof: dropped whole)")
                    continue
                # Its own input committed to other seeds: it is the culprit, and the
                # pair mask with ``wrong`` is known to nobody else in the sum. Both
                # statements are signed: the proof its neighbours check at recovery.
                self.culprits[node] = (f"revealed a pair seed for node {wrong[0]} that does not "
                                       "match its own commitment of this round")
                self.evidence[node] = CulpritEvidence(
                    self.commitments[node], committed, self.input_signatures[node],
                    dict(reveal.pair_seeds), reveal.signature)
                self._exclude(node, self.culprits[node])
                continue
            self.reveals[node] = reveal
        self.stats.unmasked = sorted(self.reveals)
        self._require(len(self.reveals), Stage.UNMASK)

    # -- recovery from a proven wrong pair seed ----------------------------------------
    def recovery_requests(self) -> dict[int, dict[int, CulpritEvidence]]:
        """What to send at ``unmask-recover``: neighbour -> every proven culprit's
        evidence (empty: no culprit this round, or one that recovery cannot take out).

        A culprit's input can be taken out of the sum only if every neighbour of it
        that stays in the sum unmasked this round (it then reveals its pair seed with
        the culprit); else, or with fewer than t inputs left, nothing is asked (the
        round aborts in :meth:`aggregate`, naming the culprit, as without recovery).
        """
        culprits = {c: e for c, e in self.evidence.items() if c in self.stats.masked}
        self.recovery_needed = {}
        if not culprits:
            return {}
        remaining = [n for n in self.stats.masked if n not in culprits]
        needed: dict[int, list[int]] = {}
        for culprit in sorted(culprits):
            for peer in self.graph[culprit]:
                if peer in remaining:
                    needed.setdefault(peer, []).append(culprit)
        missing = sorted(p for p in needed if p not in self.reveals)
        if missing or len(remaining) < self._threshold:
            why = (f"neighbours {missing} of the culprits did not unmask" if missing
                   else f"{len(remaining)} inputs would remain, threshold {self._threshold}")
            logger.error("SecAgg+ session round %d: no recovery from culprits %s: %s",
                         self.server_round, sorted(culprits), why)
            return {}
        self.recovery_needed = needed
        return {peer: dict(culprits) for peer in sorted(needed)}

    def receive_recovery(self, replies: Mapping[int, Any]) -> None:
        """Check each revealed pair seed with a culprit against the revealer's own
        signed commitment of this round and keep those that match; then the culprits'
        inputs are taken out in :meth:`aggregate`. A neighbour that does not answer,
        answers malformed, or reveals a wrong seed is excluded (a wrong seed names it:
        its own commitment contradicts it); the round then aborts in :meth:`aggregate`,
        because its pair mask with the culprit cannot be removed."""
        for peer, culprits in self.recovery_needed.items():
            reply = replies.get(peer)
            for culprit in culprits:
                seed = reply.get(culprit) if isinstance(reply, Mapping) else None
                if not isinstance(seed, bytes) or len(seed) != crypto.SECRET_BYTES:
                    self._exclude(peer, f"did not reveal its pair seed with culprit {culprit} at recovery")
                    continue
                if commit_pair_seed(seed) != self.pair_commitments[peer][culprit]:
                    self.culprits[peer] = (f"revealed a pair seed for culprit {culprit} at recovery that "
                                           "does not match its own commitment of this round")
                    self._exclude(peer, self.culprits[peer])
                    continue
                self.recovered.setdefault(peer, {})[culprit] = seed
        self.removed = {c for cs in self.recovery_needed.values() for c in cs}

    def aggregate(self) -> tuple[np.ndarray, int]:
        """Remove the masks: ``(sums, sum of w_i)`` as
        :meth:`SecAggServer.aggregate <flwr_guard.secagg.server.SecAggServer.aggregate>`.

        Raises:
            SecAggAborted: a self-mask seed that is neither revealed by its owner nor
                reconstructible from t shares, a pair seed that only a client which
                dropped after its input knew, a culprit's pair seed not taken out by a
                recovery (:meth:`recovery_requests`), a neighbour's pair seed with a
                removed culprit missing, or a total weight that is impossible.
        """
        if self.masked_sum is None:
            raise SecAggAborted("no masked inputs")
        params, length = self.context.params, self.context.vector_length
        total = self.masked_sum.copy()
        for culprit in self.removed:
            total -= self.vectors[culprit]  # its whole masked input leaves the sum
        active = [n for n in self.stats.masked if n not in self.removed]
        for node in active:
            commitment = self.commitments[node]
            reveal = self.reveals.get(node)
            if reveal is not None and commit_self_mask(reveal.self_mask_seed) == commitment:
                seed = reveal.self_mask_seed
            else:
                claimed = reveal.self_mask_seed if reveal is not None else None
                if reveal is not None:
                    self._exclude(node, "revealed a self-mask seed that does not match its commitment")
                held = [(i, s, r) for r, rv in self.reveals.items()
                        for p, (i, s) in rv.shares.items() if p == node]
                # A seed is right if it matches the commitment, or if t shares held by
                # its neighbours give the very seed its owner revealed (then only the
                # owner's commitment was wrong: named above, the round goes on).

                def accept(s: bytes, c: bytes = commitment, o: bytes | None = claimed) -> bool:
                    return commit_self_mask(s) == c or s == o

                def blame(r: int, n: int = node) -> None:
                    self._exclude(r, f"revealed a wrong self-mask share of node {n}")

                seed = reconstruct_secret(
                    held, self._threshold, accept, blame,
                    f"the self-mask of node {node}", "commitment",
                    self.max_reconstruction_attempts, node,
                )
            total -= prg.expand(seed, length, params.modulus_bits)
        active_set = set(active)
        for node in active:
            for gone in self.graph[node]:
                if gone in active_set:
                    continue
                reveal = self.reveals.get(node)
                if gone in self.removed:
                    recovered = self.recovered.get(node, {}).get(gone)
                    if recovered is None:
                        why = self.culprits.get(node) or "did not reveal it at recovery"
                        raise SecAggAborted(
                            f"SecAgg+ session round aborted: node {gone} "
                            f"{self.culprits[gone]}; its input was taken out, but the pair mask "
                            f"of node {node} with it cannot be removed (node {node} {why}). No "
                            "aggregate released"
                        )
                    self._remove_pair_mask(total, node, gone, recovered)
                    continue
                if reveal is None and node in self.culprits:
                    raise SecAggAborted(
                        f"SecAgg+ session round aborted: node {node} {self.culprits[node]}; "
                        f"the pair mask with node {gone} cannot be removed. No aggregate "
                        "released; the node is named as the culprit"
                    )
                if reveal is None:
                    raise SecAggAborted(
                        f"SecAgg+ session round aborted: node {node} is in the sum but did not "
                        f"unmask, and its neighbour {gone} is not in the sum; their pair mask of "
                        "this round is known only to the two of them. No aggregate released"
                    )
                self._remove_pair_mask(total, node, gone, reveal.pair_seeds[gone])
        weights = int(total[-1])
        if weights == 0 or weights > len(active) * params.max_weight:
            raise SecAggAborted(f"unmasked total weight {weights} is impossible: masks did not cancel")
        self.summed = active
        return total[:-1].astype(np.int64), weights

    def _remove_pair_mask(self, total: np.ndarray, node: int, peer: int, seed: bytes) -> None:
        """Take the pair mask ``node`` added for ``peer`` (sign(node, peer) * PRG(seed))
        out of ``total``, in place."""
        mask = prg.expand(seed, self.context.vector_length, self.context.params.modulus_bits)
        if pairwise_sign(node, peer) > 0:
            total -= mask
        else:
            total += mask


__all__ = ["RoundStats", "SessionServer"]
