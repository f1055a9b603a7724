"""The names SecAgg+ uses on Flower's messages: stages, records, keys (no imports).

The client mod (:mod:`flwr_guard.secagg.mod`), the strategy wrapper
(:mod:`flwr_guard.secagg.strategy`), the client's policy mod
(:mod:`flwr_guard.guard.client_mod`) and the server's refusal log
(:mod:`flwr_guard.guard.refusal_reasons`) all spell them from here, in the idiom of
Flower's own ``flwr.common.secure_aggregation.secaggplus_constants`` (``Stage`` and
``Key`` classes that cannot be instantiated).

A SecAgg+ message is a train message with a ConfigRecord named :data:`SECAGG_RECORD`
holding :attr:`Key.STAGE`, :attr:`Key.SERVER_ROUND` and :attr:`Key.PAYLOAD` (the
stage's fields, encoded by :mod:`flwr_guard.secagg.codec`; their names are the other
attributes of :class:`Key`). The ``masked-input`` reply carries the masked vector in
the ArrayRecord :data:`MASKED_ARRAYS`.
"""

from __future__ import annotations

SECAGG_RECORD = "secagg"
"""Name of the ConfigRecord that makes a train message a SecAgg+ stage (both ways)."""

STATE_RECORD = "flwr-guard.secagg"
"""Name of the ConfigRecord in ``context.state`` where the client keeps its SecAgg+ state."""

MASKED_ARRAYS = "masked"
"""Name of the ArrayRecord of a ``masked-input`` reply: one masked integer vector."""

WEIGHT_KEY = "num-examples"
"""The train reply's metric that weighs the update (it travels masked, summed)."""

UNKNOWN_SESSION = "no usable SecAgg+ session on this client"
"""Start of a client's refusal that only a new set-up can cure (it holds no such session,
its storage was lost, or the round is too far ahead of its key chain): the strategy
re-keys on the next round."""


class Stage:
    """The stages of SecAgg+, in protocol order (the value of :attr:`Key.STAGE`).

    The per-round protocol runs the first six; a multi-round session runs :attr:`SETUP`
    once (without ``share-keys``) and :attr:`SESSION` every round, where
    :attr:`UNMASK_RECOVER` is sent only in a round with a proven culprit (a client whose
    signed reveal contradicts its signed commitment; docs/secagg.md, "Recovery from a
    wrong pair seed").
    """

    ADVERTISE = "advertise"
    ROSTER = "roster"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    UNMASK_RECOVER = "unmask-recover"

    ALL = (ADVERTISE, ROSTER, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK, UNMASK_RECOVER)
    """Every stage, in protocol order."""
    SETUP = (ADVERTISE, ROSTER, SHARE_KEYS)
    """The key set-up: no model and no update is sent yet."""
    SESSION = (MASKED_INPUT, CONSISTENCY, UNMASK, UNMASK_RECOVER)
    """The stages of one round of a multi-round session (the last only with a culprit)."""

    def __new__(cls) -> Stage:
        raise TypeError(f"{cls.__name__} cannot be instantiated")


class Key:
    """Keys of the :data:`SECAGG_RECORD` ConfigRecord and of the payloads it carries."""

    # the ConfigRecord's own keys
    STAGE = "stage"
    SERVER_ROUND = "server-round"
    PAYLOAD = "payload"

    # advertise: request, reply
    CONTEXT = "context"
    ADVERTISEMENT = "advertisement"
    # roster: request, reply
    ROSTER = "roster"
    NONCE = "nonce"
    # share-keys request (and a session's opening): U1's nonces, the neighbours' ads
    NONCES = "nonces"
    ADVERTISEMENTS = "advertisements"
    # share-keys reply, masked-input request, session input reply, session unmask request
    CIPHERTEXTS = "ciphertexts"
    # masked-input: request (U2), reply
    SHARED = "shared"
    BAD_SENDERS = "bad_senders"
    CLIPPED = "clipped"
    # consistency: request (U3), reply
    SURVIVORS = "survivors"
    SIGNATURE = "signature"
    # unmask: request, reply
    ACTIVE = "active"
    DROPPED = "dropped"
    SIGNATURES = "signatures"
    SHARES = "shares"

    # multi-round sessions: every session stage names the session and the round
    SESSION = "session"
    ROUND = "round"
    OPEN = "open"  # first input of a session: what the client needs to open it
    ABSENT = "absent"  # consistency / unmask: the session members not in the sum
    COMMITMENT = "commitment"  # session input reply: the self-mask seed's commitment
    PAIR_COMMITMENTS = "pair_commitments"
    SEED = "seed"  # session unmask reply: this round's self-mask seed
    PAIR_SEEDS = "pair_seeds"
    INPUT_SIGNATURE = "input_signature"  # session input reply: signed commitments
    REVEAL_SIGNATURE = "reveal_signature"  # session unmask reply: signed pair seeds
    # unmask-recover: request (the culprits' signed statements), reply (pair seeds)
    EVIDENCE = "evidence"
    RECOVERED = "recovered"

    def __new__(cls) -> Key:
        raise TypeError(f"{cls.__name__} cannot be instantiated")


__all__ = [
    "MASKED_ARRAYS",
    "SECAGG_RECORD",
    "STATE_RECORD",
    "UNKNOWN_SESSION",
    "WEIGHT_KEY",
    "Key",
    "Stage",
]
