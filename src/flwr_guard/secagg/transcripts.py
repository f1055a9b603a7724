"""What both sides of SecAgg+ hash, sign or derive the same way (no Flower imports).

Commitments (graph nonce, self-mask seed), the roster digest, the graph seed, the
associated data of an encrypted share, the signed consistency payload, and the pairwise
mask seed with its sign: the client computes each to send or to check it, the server to
check or to unmask. Every digest is a :func:`~flwr_guard.secagg.crypto.transcript`
(SHA-256 over length-prefixed fields) with its own domain label.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr_guard.secagg import crypto
from flwr_guard.secagg.context import RoundContext, ids_bytes
from flwr_guard.secagg.messages import RosterEntry, pack_roster


def commit_nonce(nonce: bytes) -> bytes:
    """Commitment to a graph nonce (SHA-256: hiding for a 256-bit random nonce, binding)."""
    return crypto.transcript(b"graph-nonce", nonce)


def roster_digest(entries: Iterable[RosterEntry]) -> bytes:
    """Digest of U1's roster in id order: bound into the graph seed and into every
    consistency signature, so clients shown different rosters never agree."""
    return crypto.transcript(b"roster", pack_roster(sorted(entries, key=lambda e: e.node_id)))


def commit_self_mask(seed: bytes) -> bytes:
    """Binding commitment to a self-mask seed (SHA-256 of a 256-bit random value), so
    the server can check a reconstruction without learning anything before it."""
    return crypto.transcript(b"self-mask-commitment", seed)


def graph_seed(context_digest: bytes, roster: bytes, nonces: Mapping[int, bytes]) -> bytes:
    """Seed of the neighbour graph: a hash of the context, the roster digest and the
    nonces every member of U1 committed to in its advertisement and revealed only
    after the roster was fixed. One honest member's nonce makes it uniform and
    unknown to the server until the roster is fixed (commit-then-reveal), so the
    server cannot re-draw the graph by choosing or re-signing roster entries."""
    return crypto.transcript(
        b"graph", context_digest, roster, *(nonces[i] for i in sorted(nonces))
    )


def share_aad(context_digest: bytes, sender: int, recipient: int) -> bytes:
    return crypto.transcript(b"share", context_digest, struct.pack(">QQ", sender, recipient))


def consistency_payload(context_digest: bytes, roster: bytes, seed: bytes, survivors: list[int]) -> bytes:
    """What a client signs in the consistency stage: the survivor set, bound to the
    round context, the roster digest and the graph seed."""
    return crypto.transcript(b"consistency", context_digest, roster, seed, ids_bytes(survivors))


def pairwise_seed(own_mask_secret: bytes, peer_mask_public: bytes, context_digest: bytes) -> bytes:
    """Seed of the pairwise mask of two clients (the same from both ends)."""
    return crypto.agree(own_mask_secret, peer_mask_public, context_digest, b"pairwise-mask")


def pairwise_sign(own: int, peer: int) -> int:
    """+1 if ``own < peer`` else -1: the pair's masks cancel in the sum."""
    return 1 if own < peer else -1


def session_digest(context: RoundContext, roster_hash: bytes) -> bytes:
    """The digest every per-round value of a session is bound to: the set-up context and
    the set-up's roster digest (fresh nonce commitments and keys), so two set-ups under
    one context never share a digest."""
    return crypto.transcript(b"session", context.digest(), roster_hash)


@dataclass(frozen=True)
class SessionRound:
    """One round of a session, as a client sees it.

    Attributes:
        session: :func:`session_digest` of the set-up context.
        server_round: the round number (strictly increasing within a session).
        model_hash: SHA-256 of the global model this client received
            (:func:`flwr_guard.secagg.model_hash`); clients shown different models
            derive different digests, so their signatures do not verify for each other.
    """

    session: bytes
    server_round: int
    model_hash: bytes

    def digest(self) -> bytes:
        return crypto.transcript(
            b"session-round", self.session, struct.pack(">Q", self.server_round), self.model_hash
        )


def commit_pair_seed(seed: bytes) -> bytes:
    """Commitment to a pair's mask seed of one round (SHA-256 of a 256-bit pseudorandom
    value: hiding, binding), sent with the input so the server can check a pair seed
    revealed later for a dropped neighbour and name a client that reveals a wrong one.
    The client relies on no check of it."""
    return crypto.transcript(b"session-pair-seed-commitment", seed)


def session_consistency_payload(round_digest: bytes, roster: bytes, seed: bytes, survivors: Sequence[int]) -> bytes:
    """What a client signs in a session round's consistency stage."""
    return crypto.transcript(b"session-consistency", round_digest, roster, seed, ids_bytes(survivors))


def _id_map_parts(values: Mapping[int, bytes]) -> list[bytes]:
    """``values`` as transcript parts in id order: big-endian id, then its value (each
    length-prefixed by :func:`~flwr_guard.secagg.crypto.transcript`: unambiguous)."""
    parts: list[bytes] = []
    for node in sorted(values):
        parts += [struct.pack(">Q", node), values[node]]
    return parts


def session_input_payload(
    round_digest: bytes, node: int, self_mask_commitment: bytes, pair_commitments: Mapping[int, bytes]
) -> bytes:
    """What a client signs with its session input: its id, its commitment to the round's
    self-mask seed and its :func:`commit_pair_seed` commitments (neighbour id -> 32 bytes),
    bound to the round digest (session, round, model). With the signed reveal
    (:func:`session_reveal_payload`) it makes a wrong pair seed provable to third parties:
    an honest client derives both from one pair key and one digest, so it never signs
    two statements that contradict each other."""
    return crypto.transcript(
        b"session-input-commitments", round_digest, struct.pack(">Q", node), self_mask_commitment,
        *_id_map_parts(pair_commitments),
    )


def session_reveal_payload(round_digest: bytes, node: int, pair_seeds: Mapping[int, bytes]) -> bytes:
    """What a client signs with its session reveal: its id and the pair seeds it reveals
    (neighbour out of U3 -> 32-byte seed of this round), bound to the round digest."""
    return crypto.transcript(
        b"session-pair-seed-reveal", round_digest, struct.pack(">Q", node), *_id_map_parts(pair_seeds),
    )


def wrong_pair_seeds(pair_commitments: Mapping[int, bytes], pair_seeds: Mapping[int, bytes]) -> list[int]:
    """The peers whose revealed pair seed contradicts the commitment to it (sorted)."""
    return sorted(p for p, seed in pair_seeds.items()
                  if p in pair_commitments and commit_pair_seed(seed) != pair_commitments[p])
