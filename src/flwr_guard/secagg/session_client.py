"""Multi-round SecAgg+, the client side: keys set up once per cohort, three messages per
round (no Flower imports).

For a stable cohort (the cross-silo case: the same nodes every round) the key set-up of
SecAgg+ is the same work every round. A *session* runs it once and then aggregates
many rounds with one masked input, one consistency signature and one reveal per client
per round. The design follows the set-up-once idea of Flamingo (Ma et al., "Flamingo:
Multi-Round Single-Server Secure Aggregation with Applications to Private Federated
Learning", IEEE S&P 2023, section 3); docs/secagg.md compares the two and gives the
security argument.

Set-up (once; the stages of :mod:`flwr_guard.secagg.client`, under a round context with
``multi_round=True``, so its signatures never verify for a per-round round):

1. advertise: X25519 keys for share encryption and for masks, a committed graph nonce,
   signed with the long-term Ed25519 key (policy checks as per round);
2. roster: every entry verified against the federation roster, nonces revealed;
3. the first round's input message carries the nonces and the neighbours'
   advertisements: :meth:`SessionClient.open` checks them, derives the graph (nobody
   chooses it) and, per neighbour ``v``, a share-encryption key and a **pair key**
   ``K_uv`` (X25519 + HKDF, salted with :func:`~flwr_guard.secagg.transcripts.session_digest`: the set-up context and
   its roster digest). The X25519 private keys are then erased: nothing of the set-up
   is ever revealed, so dropouts never force a re-key. Pair keys are hash chains
   ratcheted to the round of each input (:func:`ratchet`), so a state read at round R
   unmasks no earlier round.

Each round ``r`` of the session (:class:`~flwr_guard.secagg.transcripts.SessionRound`, bound to the session digest,
the round number and the hash of the model the client received):

4. input: the client masks ``w * q(update)`` with a **fresh** self mask ``PRG(b_u^r)``
   and, for every neighbour, ``+-PRG(HKDF(K_uv^r, round digest))`` (``K_uv^r``: the
   pair key ratcheted to round r); it sends the masked
   vector, a commitment to ``b_u^r`` and Shamir shares of ``b_u^r`` (threshold t), each
   encrypted for its neighbour under the share-encryption key with the round digest in
   the associated data. A second input for the same or an earlier round is refused.
5. consistency: the client signs U3 (whose inputs are in the sum), bound to the round
   digest, the roster digest and the graph seed; one set per round.
6. unmask: after checking ``t`` neighbours' signatures on that U3 (its own not
   counted), the client reveals its **own** ``b_u^r`` (the server then reconstructs
   only for clients that dropped late), the shares of ``b_v^r`` of its active
   neighbours (for those late droppers), and, for each neighbour out of U3, the pair's
   mask seed **of this round only**. It never reveals both for one peer in one round.
   The input's commitments and the reveal's pair seeds are each signed (Ed25519, bound
   to the round digest), so a wrong pair seed is provable to anyone holding the roster.
7. unmask-recover (only in a round with such proof): the server sends the culprit's two
   signed statements; each honest neighbour checks them and the survivor set without
   the culprit itself (:meth:`SessionClient.recover`) and reveals its round pair seed
   with the culprit, so the server takes the culprit's input out and completes the round.

What this buys and costs (docs/secagg.md, "Multi-round sessions"): a round is three
messages, not six; per round no X25519 agreement and no share of a long-term secret.
A dropped client's key material stays secret (only its round-r pair seeds are
revealed, which mask nothing in any other round), so it rejoins the next round without
a re-key. The price: a client that drops between its input and its reveal while a
neighbour of it is out of U3 sinks the round (its pair seed with that neighbour is
known only to the two of them); the round then releases nothing and the next one runs.
"""

from __future__ import annotations

import hmac
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr_guard.secagg import crypto, prg
from flwr_guard.secagg.client import SecAggClient, check_min_inputs, count_neighbour_signatures, encode_input
from flwr_guard.secagg.constants import UNKNOWN_SESSION, Stage
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.graph import neighbours
from flwr_guard.secagg.messages import (
    ROUND_SHARE_CIPHERTEXT_BYTES,
    Advertisement,
    CulpritEvidence,
    RosterEntry,
    RoundInput,
    RoundReveal,
    pack_roster,
    unpack_roster,
)
from flwr_guard.secagg.policy import PolicyViolation, SecAggPolicy
from flwr_guard.secagg.round_ledger import RoundLedger
from flwr_guard.secagg.transcripts import (
    SessionRound,
    commit_pair_seed,
    commit_self_mask,
    pairwise_sign,
    roster_digest,
    session_consistency_payload,
    session_digest,
    session_input_payload,
    session_reveal_payload,
    wrong_pair_seeds,
)

MAX_ROUND_GAP = 10_000
"""Most rounds a client's pair-key chains advance in one step (a hash per round per
neighbour): a round further ahead is refused with :data:`~flwr_guard.secagg.constants.UNKNOWN_SESSION`."""


def ratchet(chain_key: bytes, steps: int) -> bytes:
    """Advance a pair-key chain ``steps`` rounds: ``K <- HMAC-SHA256(K, 0x02)`` per round,
    the symmetric-key ratchet of the Signal Double Ratchet specification (section 5.2).
    One-way: a chain key read at round R gives no earlier round's key (forward secrecy)."""
    for _ in range(steps):
        chain_key = hmac.digest(chain_key, b"\x02", "sha256")
    return chain_key


def round_pair_seed(chain_key: bytes, round_digest: bytes) -> bytes:
    """The pair's mask seed for one round: HKDF-SHA256 of the pair's chain key at that
    round (:func:`ratchet`), salted with the round digest. Seeds of different rounds
    are independent for whoever lacks the chain keys, so revealing one (its owner
    dropped) unmasks nothing in another round."""
    return crypto.derive(chain_key, round_digest, b"session-pairwise-mask")


def is_connected(graph: Mapping[int, Sequence[int]], members: Sequence[int]) -> bool:
    """Whether the subgraph of ``graph`` induced by ``members`` is connected (BFS)."""
    inside = set(members)
    if not inside:
        return False
    start = next(iter(inside))
    seen, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for peer in graph[node]:
            if peer in inside and peer not in seen:
                seen.add(peer)
                frontier.append(peer)
    return seen == inside


def round_share_aad(round_digest: bytes, sender: int, recipient: int) -> bytes:
    return crypto.transcript(b"session-share", round_digest, struct.pack(">QQ", sender, recipient))


@dataclass
class SessionClient:
    """One client's state in a multi-round session; survives process restarts via
    :meth:`to_state` / :meth:`from_state`.

    Secrets and their lifetimes: the share-encryption keys (one per neighbour) for the
    session; the pair keys (one per neighbour) as chains ratcheted to the round of the
    last input (:func:`ratchet`: a state read at round R unmasks no earlier round); the
    round's self-mask seed from its input until its reveal. The X25519 private keys of
    the set-up are erased by :meth:`open`.
    """

    node_id: int
    signing_secret: bytes
    policy: SecAggPolicy
    context: RoundContext
    roster: dict[int, RosterEntry]
    roster_hash: bytes
    seed: bytes
    neighbour_ids: list[int]
    share_keys: dict[int, bytes] = field(default_factory=dict)
    pair_keys: dict[int, bytes] = field(default_factory=dict)
    chain_round: int = 0
    last_round: int = -1
    round: dict[str, Any] = field(default_factory=dict)
    opened_at: float = 0.0
    ledger: RoundLedger | None = field(default=None, repr=False)
    """The node's round ledger (not saved with the state: it lives outside it)."""

    @property
    def digest(self) -> bytes:
        """:func:`session_digest` of this session."""
        return session_digest(self.context, self.roster_hash)

    @classmethod
    def open(
        cls, setup: SecAggClient, advertisements: Sequence[Advertisement], nonces: Mapping[int, bytes]
    ) -> SessionClient:
        """Open the session after the roster stage of a ``multi_round`` set-up.

        Raises:
            ProtocolError: the set-up is not a multi-round one or not past its roster
                stage, a nonce or advertisement does not check
                (:meth:`SecAggClient.verify_graph`), or a neighbour's X25519 key is
                invalid.
        """
        context = setup._require_context()
        if not context.multi_round:
            raise ProtocolError("a per-round SecAgg+ set-up cannot open a multi-round session")
        if not setup.roster or not setup.encryption_secret or not setup.mask_secret:
            raise ProtocolError("the session was already opened, or its roster stage did not run")
        seed, neighbour_ids, by_id = setup.verify_graph(advertisements, nonces)
        salt = session_digest(context, setup.roster_hash)
        share_keys, pair_keys = {}, {}
        for peer in neighbour_ids:
            try:
                share_keys[peer] = crypto.agree(
                    setup.encryption_secret, by_id[peer].encryption_key, salt, b"session-share-encryption"
                )
                pair_keys[peer] = crypto.agree(
                    setup.mask_secret, by_id[peer].mask_key, salt, b"session-pair-key"
                )
            except crypto.CryptoError as err:
                raise ProtocolError(f"node {peer} advertised an invalid X25519 key") from err
        setup.encryption_secret = setup.mask_secret = b""  # only the derived keys stay
        return cls(
            node_id=setup.node_id, signing_secret=setup.signing_secret, policy=setup.policy,
            context=context, roster=dict(setup.roster), roster_hash=setup.roster_hash,
            seed=seed, neighbour_ids=list(neighbour_ids), share_keys=share_keys, pair_keys=pair_keys,
            chain_round=context.server_round, opened_at=time.time(),
        )

    @property
    def threshold(self) -> int:
        return self.context.params.reconstruction_threshold

    def _round(self, server_round: int, stage: str) -> dict[str, Any]:
        if self.round.get("server_round") != server_round:
            raise ProtocolError(f"{stage} for round {server_round}, which this client has no input for")
        return self.round

    def check_policy(self, pinned: Mapping[int, bytes]) -> None:
        """Re-check the session's set-up against the node's policy as it is now (called
        at every session stage): a member since removed from the roster, or a C raised
        since (a larger roster or node config) that the set-up's t no longer meets, ends
        the session instead of counting for up to ``max_session_rounds`` more rounds.

        Args:
            pinned: keys pinned on first use (node id -> Ed25519 public key), for a
                policy without a roster.

        Raises:
            ProtocolError: starting with :data:`~flwr_guard.secagg.constants.UNKNOWN_SESSION` (the server re-keys),
                naming the policy's reason.
        """
        try:
            self.policy.check_context(self.context)
            for entry in self.roster.values():
                self.policy.check_member(entry.node_id, entry.signing_key, pinned)
        except PolicyViolation as err:
            raise ProtocolError(
                f"{UNKNOWN_SESSION}: this node's SecAgg+ policy no longer accepts the session's "
                f"set-up ({err}); the server must re-key"
            ) from None

    # -- input -------------------------------------------------------------------------
    def check_input_round(self, server_round: int, now: float | None = None) -> None:
        """Raise unless this client may send an input for ``server_round`` (called before
        training, so a refused round costs no training).

        Args:
            now: the wall clock (``time.time()``, seconds) to check the session's age at.

        Raises:
            ProtocolError: a round not after the last one answered (replayed or rewound),
                more than :data:`MAX_ROUND_GAP` rounds ahead of the key chain, or past
                the policy's cap on the session's length (``max_session_rounds`` from
                the set-up's round, ``max_session_seconds`` from the opening): the last
                two start with :data:`~flwr_guard.secagg.constants.UNKNOWN_SESSION` and ask the server to re-key;
                or a round not above the one the node's :attr:`ledger` records (its
                state was rolled back), or a ledger that cannot be read.
        """
        if not isinstance(server_round, int) or server_round <= max(self.last_round, self.chain_round - 1):
            raise ProtocolError(
                f"input for round {server_round} refused: this client already sent the input "
                f"of round {self.last_round} of this session (replayed or rewound round)"
            )
        span = server_round - self.context.server_round + 1
        if span > self.policy.max_session_rounds:
            raise ProtocolError(
                f"{UNKNOWN_SESSION}: round {server_round} would be round {span} of a session set "
                f"up in round {self.context.server_round}, this client's policy caps a session at "
                f"{self.policy.max_session_rounds} rounds (secagg-max-session-rounds); the server "
                "must re-key"
            )
        age = (time.time() if now is None else now) - self.opened_at
        if not math.isfinite(age) or age > self.policy.max_session_seconds:
            raise ProtocolError(
                f"{UNKNOWN_SESSION}: the session was opened {age:.0f} s ago, this client's policy "
                f"caps a session at {self.policy.max_session_seconds:.0f} s "
                "(secagg-max-session-seconds); the server must re-key"
            )
        if self.ledger is not None:
            self.ledger.check(self.digest, server_round, self.opened_at)
        if server_round - self.chain_round > MAX_ROUND_GAP:
            raise ProtocolError(
                f"{UNKNOWN_SESSION}: round {server_round} is more than {MAX_ROUND_GAP} rounds "
                f"after this client's key chain (round {self.chain_round}); the server must re-key"
            )

    def masked_input(
        self,
        server_round: int,
        received_model_hash: bytes,
        update: np.ndarray,
        weight: int,
        rng: np.random.Generator | None = None,
        metric_values: Sequence[int | float] = (),
        noise: np.ndarray | None = None,
        min_inputs: int = 0,
    ) -> RoundInput:
        """Mask this round's weighted, quantised update (stage 4 of the module docstring).

        Args:
            server_round: the round; must exceed every round this client sent an input for.
            received_model_hash: hash of the global model this client trains from.
            update, weight, metric_values, noise: as :func:`~flwr_guard.secagg.client.encode_input`.
            min_inputs: the fewest inputs this client lets into the unmasked sum (with
                distributed DP: the contributors its noise share was scaled for).

        Raises:
            ProtocolError: as :meth:`check_input_round` (a round not after the last one:
                a second input under the same masks would reveal the difference of two
                inputs), or the node's :attr:`ledger` refuses or cannot be written; on
                any error this client is left exactly as it was (its open round, if any,
                still unmasks from its own chain link).
            ValueError: as :func:`~flwr_guard.secagg.client.encode_input`.
        """
        self.check_input_round(server_round)
        params = self.context.params
        vector, clipped = encode_input(self.context, update, weight, metric_values, noise, rng)
        # Transactional: the ratcheted chain, the round and its state are computed into
        # locals and assigned together only after the ledger write, so a refused input
        # (ledger unwritable, or advanced by another process) leaves this object exactly
        # as it was: its open round still reveals from that round's chain link.
        steps = server_round - self.chain_round
        pair_keys = {p: ratchet(k, steps) for p, k in self.pair_keys.items()}
        digest = SessionRound(self.digest, server_round, received_model_hash).digest()
        self_mask_seed = crypto.random_secret()
        shares = crypto.share_secret(self_mask_seed, self.threshold, len(self.neighbour_ids))
        ciphertexts = {
            peer: crypto.encrypt(
                self.share_keys[peer], struct.pack(">H", index) + share,
                round_share_aad(digest, self.node_id, peer),
            )
            for peer, (index, share) in zip(self.neighbour_ids, shares, strict=True)
        }
        length = self.context.vector_length
        vector += prg.expand(self_mask_seed, length, params.modulus_bits)
        pair_commitments = {}
        for peer in self.neighbour_ids:
            pair_seed = round_pair_seed(pair_keys[peer], digest)
            pair_commitments[peer] = commit_pair_seed(pair_seed)
            mask = prg.expand(pair_seed, length, params.modulus_bits)
            if pairwise_sign(self.node_id, peer) > 0:
                vector += mask
            else:
                vector -= mask
        if self.ledger is not None:
            self.ledger.advance(self.digest, server_round, self.opened_at)  # durable before the input leaves
        self.pair_keys = pair_keys  # the earlier chain keys are gone
        self.chain_round = server_round
        self.last_round = server_round
        self.round = {"server_round": server_round, "digest": digest,
                      "self_mask_seed": self_mask_seed, "signed": None, "revealed": False,
                      "min_inputs": int(min_inputs),
                      # [peer, commitment] pairs (the codec's dicts have str keys)
                      "pair_commitments": [[p, c] for p, c in pair_commitments.items()]}
        commitment = commit_self_mask(self_mask_seed)
        signature = crypto.sign(
            self.signing_secret, session_input_payload(digest, self.node_id, commitment, pair_commitments)
        )
        return RoundInput(vector, commitment, ciphertexts, clipped, pair_commitments, signature)

    # -- consistency ------------------------------------------------------------------
    def consistency(self, server_round: int, survivors: Sequence[int]) -> bytes:
        """Sign U3 of this round.

        Raises:
            ProtocolError: no input of this client for the round, U3 outside the
                session's roster or without this client, fewer than t of its
                neighbours in U3, U3 smaller than the policy's ``min_cohort``, or a
                second, different U3 for the round.
        """
        state = self._round(server_round, Stage.CONSISTENCY)
        u3 = sorted(set(survivors))
        if not set(u3) <= set(self.roster) or self.node_id not in u3:
            raise ProtocolError("the survivor set is not within the session's cohort, or omits this client")
        self._check_survivors(u3, int(state.get("min_inputs", 0)))
        if state["signed"] is not None and state["signed"] != u3:
            raise ProtocolError("asked to sign a second, different survivor set")
        state["signed"] = u3
        return crypto.sign(
            self.signing_secret,
            session_consistency_payload(state["digest"], self.roster_hash, self.seed, u3),
        )

    def _check_survivors(self, u3: list[int], min_inputs: int) -> None:
        """The policy checks of a survivor set (consistency and recovery alike).

        Raises:
            ProtocolError: U3 below the policy's smallest sum or ``min_inputs``, fewer
                than t of this client's neighbours in it, or not connected in the graph.
        """
        self.policy.check_sum_size(len(u3), "a survivor set (the inputs of the sum)")
        check_min_inputs(len(u3), min_inputs)
        active = [v for v in self.neighbour_ids if v in set(u3)]
        if len(active) < self.threshold:
            raise ProtocolError(
                f"{len(active)} of this client's neighbours are in the sum, reconstruction "
                f"threshold {self.threshold}"
            )
        # Neighbours check each other's round digests (the model); over a connected U3
        # that makes the digest one for all, so no server can hand disjoint parts of
        # the sum different models and unmask each part's sum on its own.
        graph = neighbours(list(self.roster), self.context.params.num_shares, self.seed)
        if not is_connected(graph, u3):
            raise ProtocolError(
                "the survivor set falls apart into parts with no neighbours between them "
                "(a server showing each part another model could unmask each part's sum)"
            )

    # -- unmask -----------------------------------------------------------------------
    def unmask(
        self,
        server_round: int,
        active: Sequence[int],
        signatures: Mapping[int, bytes],
        ciphertexts: Mapping[int, bytes],
    ) -> RoundReveal:
        """Reveal this round's secrets (stage 6 of the module docstring).

        Args:
            active: U3, as signed in :meth:`consistency`.
            signatures: signer -> consistency signature (its neighbours' at least).
            ciphertexts: active neighbour -> the share of its self-mask seed it
                encrypted for this client (routed by the server).

        Raises:
            ProtocolError: ``active`` is not the set this client signed, a signature
                from a node that is not active or that does not verify, fewer than t
                valid neighbours' signatures, or a second reveal for the round.
        """
        state = self._round(server_round, Stage.UNMASK)
        active_set = set(active)
        if state["signed"] is None or sorted(active_set) != state["signed"]:
            raise ProtocolError("the active set differs from the survivor set this client signed")
        if state["revealed"]:
            raise ProtocolError(f"round {server_round} was already unmasked by this client")
        digest = state["digest"]
        payload = session_consistency_payload(digest, self.roster_hash, self.seed, sorted(active_set))
        valid = count_neighbour_signatures(
            self.node_id, self.neighbour_ids, self.roster, active_set, payload, signatures
        )
        if valid < self.threshold:
            raise ProtocolError(
                f"{valid} valid consistency signatures from neighbours (its own not counted), "
                f"{self.threshold} needed"
            )
        if not isinstance(ciphertexts, Mapping):
            raise ProtocolError("ciphertexts must be a mapping of sender id to bytes")
        graph = neighbours(list(self.roster), self.context.params.num_shares, self.seed)
        shares: dict[int, tuple[int, bytes]] = {}
        bad: list[int] = []
        pair_seeds: dict[int, bytes] = {}
        for peer in self.neighbour_ids:
            if peer in active_set:
                share = self._open_share(peer, ciphertexts.get(peer), digest)
                if share is None or share[0] != graph[peer].index(self.node_id) + 1:
                    bad.append(peer)
                else:
                    shares[peer] = share
            else:
                pair_seeds[peer] = self._own_pair_seed(state, peer, Stage.UNMASK)
        state["revealed"] = True
        seed, state["self_mask_seed"] = state["self_mask_seed"], b""
        signature = crypto.sign(self.signing_secret, session_reveal_payload(digest, self.node_id, pair_seeds))
        return RoundReveal(seed, shares, pair_seeds, bad, signature)

    # -- recovery from a proven wrong pair seed ---------------------------------------
    def recover(self, server_round: int, evidence: Mapping[int, CulpritEvidence]) -> dict[int, bytes]:
        """Reveal this round's pair seed with each proven culprit that is a neighbour
        (stage ``unmask-recover``; docs/secagg.md, "Recovery from a wrong pair seed").

        Before revealing anything the client checks, itself, for every named culprit
        C: C is a session member in the survivor set U3 this client signed, not this
        client; C's signed input and C's signed reveal both verify under C's roster key
        over **this client's** round digest (this session, round and model); and C's
        revealed pair seed for some peer contradicts C's own signed commitment to it
        (an honest client never signs two such statements). Then: at least one
        culprit is its neighbour, it has unmasked this round and not yet answered a
        recovery of it, and ``U3 minus the culprits`` meets its policy exactly as at
        the consistency stage (smallest sum, ``dp-min-contributors``, t neighbours,
        connected in the graph).

        Args:
            server_round: the round (the one of this client's last input).
            evidence: culprit id -> its :class:`CulpritEvidence`.

        Returns:
            culprit neighbour id -> the 32-byte pair seed of this round with it.

        Raises:
            ProtocolError: naming the check that failed; nothing is revealed then.
        """
        state = self._round(server_round, Stage.UNMASK_RECOVER)
        if state["signed"] is None or not state["revealed"]:
            raise ProtocolError(f"recovery for round {server_round} before this client unmasked it")
        if state.get("recovered") is not None:
            raise ProtocolError(
                f"a second recovery for round {server_round} refused: this client already answered "
                f"one (culprits {state['recovered']})"
            )
        if not isinstance(evidence, Mapping) or not evidence:
            raise ProtocolError("a recovery request must name at least one culprit with its evidence")
        signed = set(state["signed"])
        digest = state["digest"]
        for culprit, proof in evidence.items():
            self._check_evidence(culprit, proof, signed, digest)
        mine = sorted(c for c in evidence if c in self.neighbour_ids)
        if not mine:
            raise ProtocolError(
                f"none of the named culprits {sorted(evidence)} is a neighbour of this client: "
                "it holds no pair seed with them"
            )
        remaining = sorted(signed - set(evidence))
        try:
            self._check_survivors(remaining, int(state.get("min_inputs", 0)))
        except ProtocolError as err:
            raise ProtocolError(f"the survivor set without the culprits is refused: {err}") from None
        seeds = {c: self._own_pair_seed(state, c, Stage.UNMASK_RECOVER) for c in mine}
        state["recovered"] = sorted(evidence)
        return seeds

    def _own_pair_seed(self, state: dict[str, Any], peer: int, stage: str) -> bytes:
        """This round's pair seed with ``peer``, checked against this client's own signed
        commitment of the round (kept in the round state): an honest client never signs
        a seed that contradicts its commitment, whatever happened to its state (a chain
        ratcheted past the open round would otherwise hand the server a valid signed
        "proof" against it at ``unmask-recover``).

        Raises:
            ProtocolError: the round state has no commitment for ``peer``, or the seed
                this client would reveal does not match it.
        """
        seed = round_pair_seed(self.pair_keys[peer], state["digest"])
        committed = {int(p): bytes(c) for p, c in state.get("pair_commitments") or []}
        if peer not in committed or not hmac.compare_digest(commit_pair_seed(seed), committed[peer]):
            raise ProtocolError(
                f"{stage} for round {state['server_round']} refused: the pair seed with node {peer} "
                "does not match this client's own commitment of the round (its key chain is "
                f"at round {self.chain_round}); nothing contradicting a signed statement is signed"
            )
        return seed

    def _check_evidence(self, culprit: int, proof: CulpritEvidence, signed: set[int], digest: bytes) -> None:
        """Raise :class:`ProtocolError` unless ``proof`` shows that ``culprit`` signed a
        wrong pair seed in this client's round (see :meth:`recover`)."""
        if culprit == self.node_id:
            raise ProtocolError("the recovery request names this client as the culprit")
        if culprit not in self.roster:
            raise ProtocolError(f"culprit {culprit} is not a member of this session")
        if culprit not in signed:
            raise ProtocolError(f"culprit {culprit} is not in the survivor set this client signed")
        if not isinstance(proof, CulpritEvidence):
            raise ProtocolError(f"the evidence against node {culprit} is malformed")
        key = self.roster[culprit].signing_key
        try:
            crypto.verify(key, session_input_payload(
                digest, culprit, proof.self_mask_commitment, proof.pair_commitments), proof.input_signature)
        except crypto.CryptoError:
            raise ProtocolError(
                f"the signed input of culprit {culprit} does not verify under its roster key for "
                "this round (forged, re-signed, or from another round or session)"
            ) from None
        try:
            crypto.verify(key, session_reveal_payload(digest, culprit, proof.pair_seeds), proof.reveal_signature)
        except crypto.CryptoError:
            raise ProtocolError(
                f"the signed reveal of culprit {culprit} does not verify under its roster key for "
                "this round (forged, re-signed, or from another round or session)"
            ) from None
        if not wrong_pair_seeds(proof.pair_commitments, proof.pair_seeds):
            raise ProtocolError(
                f"every pair seed culprit {culprit} revealed matches its signed commitment: "
                "no proof of a wrong pair seed"
            )

    def _open_share(self, sender: int, blob: Any, digest: bytes) -> tuple[int, bytes] | None:
        if not isinstance(blob, bytes) or len(blob) != ROUND_SHARE_CIPHERTEXT_BYTES:
            return None
        try:
            plaintext = crypto.decrypt(self.share_keys[sender], blob, round_share_aad(digest, sender, self.node_id))
        except crypto.CryptoError:
            return None
        (index,) = struct.unpack(">H", plaintext[:2])
        return index, plaintext[2:]

    # -- persistence ------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """A dict of JSON values and bytes (see :mod:`flwr_guard.secagg.codec`)."""
        return {
            "node_id": self.node_id,
            "context": self.context.to_dict(),
            "roster": pack_roster(self.roster.values()),
            "seed": self.seed,
            "neighbour_ids": self.neighbour_ids,
            "share_keys": [[p, k] for p, k in self.share_keys.items()],
            "pair_keys": [[p, k] for p, k in self.pair_keys.items()],
            "chain_round": self.chain_round,
            "last_round": self.last_round,
            "round": self.round,
            "opened_at": self.opened_at,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], signing_secret: bytes, policy: SecAggPolicy) -> SessionClient:
        """Inverse of :meth:`to_state` (the node's own storage).

        Raises:
            ProtocolError: the state is not one :meth:`to_state` wrote.
        """
        try:
            roster = {e.node_id: e for e in unpack_roster(state["roster"])}
            return cls(
                node_id=int(state["node_id"]), signing_secret=signing_secret, policy=policy,
                context=RoundContext.from_dict(state["context"]), roster=roster,
                roster_hash=roster_digest(roster.values()), seed=bytes(state["seed"]),
                neighbour_ids=[int(i) for i in state["neighbour_ids"]],
                share_keys={int(p): bytes(k) for p, k in state["share_keys"]},
                pair_keys={int(p): bytes(k) for p, k in state["pair_keys"]},
                chain_round=int(state["chain_round"]),
                last_round=int(state["last_round"]), round=dict(state["round"]),
                # a state without the opening time is treated as expired (re-key)
                opened_at=float(state.get("opened_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"the saved SecAgg+ session is unreadable: {err}") from err


__all__ = [
    "MAX_ROUND_GAP",
    "SessionClient",
    "is_connected",
    "ratchet",
    "round_pair_seed",
]
