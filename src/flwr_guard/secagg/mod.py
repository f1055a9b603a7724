"""Client mod: run the client side of SecAgg+ around the user's ``@app.train``.

Usage::

    from flwr_guard.secagg import secaggplus_mod

    @app.train(mods=[secaggplus_mod])
    def train(msg, context): ...

The server side (:class:`~flwr_guard.secagg.strategy.SecAggPlus`) sends up to seven
kinds of train message, told apart by the ``secagg`` ConfigRecord
(:class:`~flwr_guard.secagg.constants.Stage`; ``unmask-recover`` only in a session
round with a proven culprit). All but one are protocol stages that this mod answers
itself; the ``masked-input`` one carries the global model, is passed
to the user's function, and its reply is turned into a masked integer vector: the
update ``reply arrays - global arrays``, quantised, weighted by ``num-examples`` and
masked. Only masked integers leave the device for the model. ``num-examples`` and the
integer metrics the server names in ``masked_metrics`` travel masked too (only their
sums are revealed); the reply's other metrics travel in the clear.

Place this mod first (outermost) in the list: the protocol stages are answered here
and never reach the mods inside it.

State between stages lives in ``context.state`` (the node's own storage): a SuperNode
starts a new ClientApp process for every message.

What the node accepts is its own :class:`~flwr_guard.secagg.policy.SecAggPolicy`, read
from its node config (``flower-supernode --node-config``; keys in docs/secagg.md):

- ``secagg-signing-key``: file with the node's long-term Ed25519 key (64 hex digits,
  :func:`~flwr_guard.secagg.keys.write_signing_key`); the federation roster lists its
  public key. Without it the key is created in ``context.state`` on first use, which
  only trust on first use can accept (a roster cannot list it in advance).
- ``secagg-roster``: the federation roster file (JSON or TOML); every cohort member's
  key must be on it. ``secagg-roster-admin-key``: hex Ed25519 public key of the
  administrator; the roster must then carry its valid signature.
- ``secagg-trust-on-first-use``: ``true`` to run without a roster (keys pinned on first
  sight; no protection against a Sybil cohort). Default: ``false``, except in Flower's
  simulation runtime, where it is ``true``.
- ``secagg-min-cohort``, ``secagg-min-num-shares``,
  ``secagg-min-reconstruction-threshold``, ``secagg-corrupt-fraction``,
  ``secagg-dropout-fraction``, ``secagg-security-bits``, ``secagg-max-colluders``,
  ``secagg-min-honest-others``, ``secagg-max-session-rounds``,
  ``secagg-max-session-seconds``: the policy's bounds (the colluder bound C is absolute).
- ``secagg-round-ledger``: an absolute path of a file, outside ``context.state``, where the node records
  (fsync-ed before each masked input leaves) the last round of each session and round
  context: an input for a round not above it is refused, so a node whose state is
  rolled back never masks a round twice (:mod:`flwr_guard.secagg.round_ledger`).

A round that asks for less, or a message that does not parse, is answered with an
error reply naming the reason; the server counts this client as dropped.

Model binding: the ``masked-input`` message must hold exactly one ArrayRecord, whose
hash must be the one announced for the round; the user's function sees only it.
"""

from __future__ import annotations

import logging
import struct
import sys

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from flwr_guard.config_values import number, raw_bytes
from flwr_guard.dp.distributed_client import distributed_dp_noise
from flwr_guard.keys import TrainConfig
from flwr_guard.secagg import codec, crypto
from flwr_guard.secagg.arrays import flat_update, model_hash
from flwr_guard.secagg.client import SecAggClient
from flwr_guard.secagg.constants import (
    MASKED_ARRAYS,
    SECAGG_RECORD,
    STATE_RECORD,
    UNKNOWN_SESSION,
    WEIGHT_KEY,
    Key,
    Stage,
)
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.keys import load_signing_key
from flwr_guard.secagg.messages import (
    ROUND_SHARE_CIPHERTEXT_BYTES,
    CulpritEvidence,
    unpack_advertisements,
    unpack_nonces,
    unpack_roster,
)
from flwr_guard.secagg.policy import (
    NODE_ROUND_LEDGER,
    NODE_SIGNING_KEY,
    SecAggPolicy,
    policy_from_node_config,
)
from flwr_guard.secagg.round_ledger import RoundLedger
from flwr_guard.secagg.session_client import SessionClient
from flwr_guard.secagg.transcripts import session_digest

logger = logging.getLogger(__name__)


def _error(msg: Message, reason: str) -> Message:
    logger.error("SecAgg+ mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _reply(msg: Message, payload: dict, extra: RecordDict | None = None) -> Message:
    content = extra if extra is not None else RecordDict()
    content[SECAGG_RECORD] = ConfigRecord({Key.PAYLOAD: codec.encode(payload)})
    return Message(content=content, reply_to=msg)


def in_simulation() -> bool:
    """Whether this ClientApp runs inside Flower's simulation runtime (a Ray actor of
    the simulation engine: one process tree, one operator, nothing to trust across)."""
    return "flwr.simulation.ray_transport.ray_actor" in sys.modules


def node_policy(context: Context) -> SecAggPolicy:
    """The node's :class:`SecAggPolicy` from its node config (see the module docstring).

    Raises:
        ValueError: a malformed value or roster (the message names the key).
    """
    return policy_from_node_config(context.node_config, simulation=in_simulation())


def _signing_secret(context: Context, policy: SecAggPolicy) -> bytes:
    path = context.node_config.get(NODE_SIGNING_KEY)
    if path:
        return load_signing_key(str(path))
    if policy.roster is not None:
        raise ProtocolError(
            f"node config sets a federation roster but no {NODE_SIGNING_KEY}: the roster "
            "must list this node's key, so give the node a stable key file "
            "(flwr_guard.secagg.keys.write_signing_key)"
        )
    state = context.state.config_records.get(STATE_RECORD)
    if state is None or "signing-secret" not in state:
        secret, _ = crypto.ed25519_keypair()
        record = ConfigRecord({"signing-secret": secret})
        if state is not None and "round" in state:
            record["round"] = state["round"]
        context.state[STATE_RECORD] = record
        return secret
    return raw_bytes(state["signing-secret"], "signing-secret")


def _state(context: Context) -> ConfigRecord:
    if STATE_RECORD not in context.state.config_records:
        context.state[STATE_RECORD] = ConfigRecord()
    return context.state.config_records[STATE_RECORD]


def _load_client(context: Context, policy: SecAggPolicy) -> SecAggClient:
    signing = _signing_secret(context, policy)
    saved = _state(context).get("round")
    if saved is None:
        raise ProtocolError("no SecAgg+ round in progress on this client")
    return SecAggClient.from_state(_decode_state(saved), signing, policy)


def _save_client(context: Context, client: SecAggClient) -> None:
    _state(context)["round"] = codec.encode(client.to_state())


def _pinned(context: Context) -> dict[int, bytes]:
    saved = _state(context).get("round")
    if saved is None:
        return {}
    return {int(p): bytes(k) for p, k in _decode_state(saved).get("pinned_keys", [])}


def _decode_state(saved: object) -> dict:
    """The node's own saved SecAgg+ state (written by this mod; bounded all the same).

    Raises:
        ProtocolError: not bytes or not decodable.
    """
    if not isinstance(saved, bytes):
        raise ProtocolError("the saved SecAgg+ state is not bytes")
    try:
        return codec.decode(saved, max_items=MAX_STATE_ITEMS)
    except codec.MalformedMessage as err:
        raise ProtocolError(f"the saved SecAgg+ state is unreadable: {err}") from err


def control_items(policy: SecAggPolicy) -> int:
    """Most structural JSON tokens a client decodes in one control message: the longest
    legitimate message is a list of ``max_cohort`` node ids (a cohort, survivor or
    absent set) next to O(k) fields, so 4 tokens per cohort member suffice."""
    return 4 * policy.max_cohort + 4096


MAX_STATE_ITEMS = 2**24
"""Bound on the tokens of the node's own saved state (it holds O(k) entries)."""


_APP_RAISED = "_flwr_guard_app_raised"


def _guarded(call_next: ClientAppCallable) -> ClientAppCallable:
    """``call_next`` whose exceptions are marked as the wrapped ClientApp's own."""

    def call(msg: Message, context: Context) -> Message:
        try:
            return call_next(msg, context)
        except Exception as err:
            try:
                setattr(err, _APP_RAISED, True)
            except AttributeError:  # pragma: no cover - exceptions without a __dict__
                pass
            raise

    return call


def _ids(payload: dict, name: str, limit: int) -> list[int]:
    values = codec.field(payload, name, list)
    if len(values) > limit or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**64 for i in values
    ):
        raise ValueError(f"SecAgg+ field {name!r} must be a list of at most {limit} node ids")
    return values


def _id_map(payload: dict, name: str, limit: int, size: int | None = None) -> dict[int, bytes]:
    """``payload[name]``: a mapping of decimal node ids to bytes (of ``size`` if given)."""
    raw = codec.field(payload, name, dict)
    if len(raw) > limit:
        raise ValueError(f"SecAgg+ field {name!r} has more than {limit} entries")
    out = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 20):
            raise ValueError(f"SecAgg+ field {name!r} has a key that is not a node id")
        if not isinstance(value, bytes) or (size is not None and len(value) != size):
            raise ValueError(f"SecAgg+ field {name!r} maps node {key} to something other than {size or ''} bytes")
        out[int(key)] = value
    return out


def secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod for SecAgg+ (see the module docstring).

    Messages without a ``secagg`` ConfigRecord, and non-train messages, pass through
    untouched. A stage that the client refuses (:class:`ProtocolError`) or cannot
    handle (malformed message, wrong shapes, NaN/Inf update, a model array that does
    not deserialise, any other exception raised while handling the message) is
    answered with an error reply; the server then counts this client as dropped. The
    payload is bounded before it is decoded (``MAX_CONTROL_BYTES``, nesting depth,
    :func:`control_items` tokens). An exception of the wrapped ClientApp itself
    propagates unchanged (Flower turns it into its own error reply).
    """
    # "train" and named train actions ("train.default", "train.<name>") alike
    if msg.metadata.message_type.split(".", 1)[0] != MessageType.TRAIN or SECAGG_RECORD not in msg.content:
        return call_next(msg, context)
    try:
        policy = node_policy(context)
        record = msg.content.config_records[SECAGG_RECORD]
        stage = record.get(Key.STAGE)
        blob = record.get(Key.PAYLOAD)
        if not isinstance(stage, str) or not isinstance(blob, bytes):
            raise ValueError("the secagg record needs a string 'stage' and a bytes 'payload'")
        if len(blob) > MAX_CONTROL_BYTES:
            raise ValueError(f"SecAgg+ {stage} payload of {len(blob)} bytes exceeds {MAX_CONTROL_BYTES}")
        payload = codec.decode(blob, max_items=control_items(policy))
        call_next = _guarded(call_next)
        if stage == Stage.ADVERTISE:
            return _advertise(msg, context, payload, policy)
        limit = policy.max_cohort
        if Key.SESSION in payload and stage in Stage.SESSION:
            return _session_stage(msg, context, policy, stage, payload, call_next)
        client = _load_client(context, policy)
        if stage == Stage.ROSTER:
            nonce = client.receive_roster(unpack_roster(codec.field(payload, Key.ROSTER, bytes)))
            _save_client(context, client)
            return _reply(msg, {Key.NONCE: nonce})
        if stage == Stage.SHARE_KEYS:
            # Every member's revealed nonce (graph) + the neighbours' advertisements.
            nonces = unpack_nonces(codec.field(payload, Key.NONCES, bytes))
            ads = unpack_advertisements(codec.field(payload, Key.ADVERTISEMENTS, bytes))
            out = client.share_keys(ads, nonces)
            _save_client(context, client)
            return _reply(msg, {Key.CIPHERTEXTS: {str(k): v for k, v in out.items()}})
        if stage == Stage.MASKED_INPUT:
            return _masked_input(msg, context, client, payload, call_next)
        if stage == Stage.CONSISTENCY:
            signature = client.consistency(_ids(payload, Key.SURVIVORS, limit))
            _save_client(context, client)
            return _reply(msg, {Key.SIGNATURE: signature})
        if stage == Stage.UNMASK:
            shares = client.unmask(
                _ids(payload, Key.ACTIVE, limit),
                _ids(payload, Key.DROPPED, limit),
                _id_map(payload, Key.SIGNATURES, limit, 64),
            )
            _save_client(context, client)
            return _reply(
                msg, {Key.SHARES: {str(p): [kind, i, s] for p, (kind, i, s) in shares.items()}}
            )
        return _error(msg, f"unknown SecAgg+ stage {stage!r}")
    except (ProtocolError, ValueError, KeyError, TypeError, OverflowError, struct.error) as err:
        return _error(msg, f"SecAgg+ refused: {err}")
    except Exception as err:
        if getattr(err, _APP_RAISED, False):
            raise  # the app's own failure, as without this mod
        # EOFError (a model array without data), RecursionError, MemoryError, ...
        return _error(msg, f"SecAgg+ refused: malformed message ({type(err).__name__}: {err})")


SESSION_STATE = "session"


def _session_stage(msg: Message, context: Context, policy: SecAggPolicy, stage: str,
                   payload: dict, call_next: ClientAppCallable) -> Message:
    """A round of a multi-round session (:mod:`flwr_guard.secagg.session_client`)."""
    digest = codec.field(payload, Key.SESSION, bytes)
    server_round = codec.field(payload, Key.ROUND, int)
    if not 0 <= server_round < 2**63:
        raise ValueError(f"SecAgg+ round {server_round} outside [0, 2^63)")
    signing = _signing_secret(context, policy)
    session = _load_session(context, signing, policy, digest)
    if session is None and stage == Stage.MASKED_INPUT and Key.OPEN in payload:
        setup = _load_client(context, policy)
        if setup.context is None or session_digest(setup.context, setup.roster_hash) != digest:
            raise ProtocolError(f"{UNKNOWN_SESSION}: its set-up is not the one announced")
        if not setup.encryption_secret:
            raise ProtocolError(f"{UNKNOWN_SESSION}: its set-up was used up; the server must re-key")
        opening = codec.field(payload, Key.OPEN, dict)
        session = SessionClient.open(
            setup,
            unpack_advertisements(codec.field(opening, Key.ADVERTISEMENTS, bytes)),
            unpack_nonces(codec.field(opening, Key.NONCES, bytes)),
        )
        # Save both now: the set-up's X25519 secrets are erased, and a failed training
        # below must not lose the session it opened.
        _save_client(context, setup)
        _save_session(context, session)
    if session is None:
        raise ProtocolError(f"{UNKNOWN_SESSION}: the server must run the set-up again")
    session.ledger = _round_ledger(context)
    session.check_policy(_pinned(context))  # the roster or C may have changed since the set-up
    limit = policy.max_cohort
    if stage == Stage.MASKED_INPUT:
        return _session_input(msg, context, session, server_round, call_next)
    if stage == Stage.CONSISTENCY:
        signature = session.consistency(server_round, _in_sum(session, payload, limit))
        _save_session(context, session)
        return _reply(msg, {Key.SIGNATURE: signature})
    if stage == Stage.UNMASK_RECOVER:
        raw = codec.field(payload, Key.EVIDENCE, dict)
        if len(raw) > limit:
            raise ValueError(f"SecAgg+ field {Key.EVIDENCE!r} has more than {limit} entries")
        evidence = {_node_key(k): CulpritEvidence.from_wire(v, limit) for k, v in raw.items()}
        seeds = session.recover(server_round, evidence)
        _save_session(context, session)
        return _reply(msg, {Key.RECOVERED: {str(c): b for c, b in seeds.items()}})
    reveal = session.unmask(
        server_round,
        _in_sum(session, payload, limit),
        _id_map(payload, Key.SIGNATURES, limit, 64),
        _id_map(payload, Key.CIPHERTEXTS, limit, ROUND_SHARE_CIPHERTEXT_BYTES),
    )
    _save_session(context, session)
    return _reply(msg, {
        Key.SEED: reveal.self_mask_seed,
        Key.SHARES: {str(p): [i, b] for p, (i, b) in reveal.shares.items()},
        Key.PAIR_SEEDS: {str(p): b for p, b in reveal.pair_seeds.items()},
        Key.BAD_SENDERS: reveal.bad_senders,
        Key.REVEAL_SIGNATURE: reveal.signature,
    })


def _node_key(key: object) -> int:
    """A node id sent as a decimal string key.

    Raises:
        ValueError: anything else.
    """
    if not (isinstance(key, str) and key.isdigit() and len(key) <= 20 and int(key) < 2**64):
        raise ValueError(f"not a node id: {str(key)[:30]!r}")
    return int(key)


def _in_sum(session: SessionClient, payload: dict, limit: int) -> list[int]:
    """U3 of a session round, sent as the session members *not* in it (``absent``: O(dropouts)
    bytes instead of O(n)).

    Raises:
        ValueError: an absent id that is not a session member.
    """
    absent = set(_ids(payload, Key.ABSENT, limit))
    if not absent <= set(session.roster):
        raise ValueError("the absent set names nodes outside the session")
    return sorted(set(session.roster) - absent)


def _round_ledger(context: Context) -> RoundLedger | None:
    """The node's round ledger (node config ``secagg-round-ledger``), if it has one."""
    path = context.node_config.get(NODE_ROUND_LEDGER)
    return RoundLedger(str(path), context.node_id) if path else None


def _load_session(context: Context, signing: bytes, policy: SecAggPolicy,
                  digest: bytes) -> SessionClient | None:
    saved = _state(context).get(SESSION_STATE)
    if saved is None:
        return None
    session = SessionClient.from_state(_decode_state(saved), signing, policy)
    return session if session.digest == digest else None


def _save_session(context: Context, session: SessionClient) -> None:
    _state(context)[SESSION_STATE] = codec.encode(session.to_state())


def _session_input(msg: Message, context: Context, session: SessionClient, server_round: int,
                   call_next: ClientAppCallable) -> Message:
    global_arrays = _single_global_model(msg)
    received_hash = model_hash(global_arrays)
    session.check_input_round(server_round)  # before training: a refused round trains nothing
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local, metrics, weight, secret_keys = _train_reply(reply, session.context)
    noise = _distributed_dp_noise(msg, session.context, weight, context.node_config, metrics)
    out = session.masked_input(
        server_round, received_hash, flat_update(local, global_arrays), weight,
        metric_values=_masked_metric_values(metrics, secret_keys), noise=noise,
        min_inputs=_min_inputs(msg, session.context, noise),
    )
    _save_session(context, session)
    return _reply(
        msg,
        {Key.COMMITMENT: out.self_mask_commitment, Key.CLIPPED: out.clipped,
         Key.CIPHERTEXTS: {str(p): c for p, c in out.ciphertexts.items()},
         Key.PAIR_COMMITMENTS: {str(p): c for p, c in out.pair_commitments.items()},
         Key.INPUT_SIGNATURE: out.signature},
        _masked_content(out.vector, metrics, secret_keys),
    )


def _single_global_model(msg: Message) -> dict[str, np.ndarray]:
    if len(msg.content.array_records) != 1:
        raise ProtocolError(
            f"the masked-input message holds {len(msg.content.array_records)} ArrayRecords, "
            "exactly one (the announced global model) is accepted: a second record could "
            "carry an unannounced model to train on"
        )
    global_record = next(iter(msg.content.array_records.values()))
    return {k: v.numpy() for k, v in global_record.items()}


def _train_reply(
    reply: Message, round_context: RoundContext
) -> tuple[dict[str, np.ndarray], MetricRecord, int, tuple[str, ...]]:
    """(local arrays, metrics, weight, names of the masked metrics) of a train reply.

    Raises:
        ValueError: not one ArrayRecord and one MetricRecord, or a metric missing.
    """
    if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
        raise ValueError("the train reply must hold one ArrayRecord and one MetricRecord")
    local = {k: v.numpy() for k, v in next(iter(reply.content.array_records.values())).items()}
    metrics = next(iter(reply.content.metric_records.values()))
    if WEIGHT_KEY not in metrics:
        raise ValueError(f"the train reply's MetricRecord lacks {WEIGHT_KEY!r}")
    weight = int(number(metrics[WEIGHT_KEY], WEIGHT_KEY))
    secret_keys = round_context.masked_metrics
    missing = [k for k in secret_keys if k not in metrics]
    if missing:
        raise ValueError(f"the train reply's MetricRecord lacks masked metrics {missing}")
    return local, metrics, weight, secret_keys


def _masked_metric_values(metrics: MetricRecord, keys: tuple[str, ...]) -> list[int | float]:
    """The values of the masked metrics, in order (the core checks that each is an integer
    in range).

    Raises:
        ValueError: a masked metric that is a list, not one number.
    """
    values: list[int | float] = []
    for key in keys:
        value = metrics[key]
        if isinstance(value, list):
            raise ValueError(f"masked metric {key!r} must be one integer, got a list")
        values.append(value)
    return values


def _masked_content(vector: np.ndarray, metrics: MetricRecord, secret_keys: tuple[str, ...]) -> RecordDict:
    plain = MetricRecord(
        {k: v for k, v in metrics.items() if k != WEIGHT_KEY and k not in secret_keys}
    )
    return RecordDict({MASKED_ARRAYS: ArrayRecord(numpy_ndarrays=[vector]), "metrics": plain})


MAX_CONTROL_BYTES = 64 * 2**20
"""Largest control payload a client decodes (the roster of 100 000 clients is 17 MB)."""


def _advertise(msg: Message, context: Context, payload: dict, policy: SecAggPolicy) -> Message:
    round_context = RoundContext.from_dict(
        codec.field(payload, Key.CONTEXT, dict), policy.max_cohort, policy.max_vector_length
    )
    if round_context.run_id != msg.metadata.run_id:
        raise ProtocolError("round context names another run")
    client = SecAggClient(
        context.node_id, _signing_secret(context, policy), policy, pinned_keys=_pinned(context)
    )
    ad = client.advertise(round_context)
    _save_client(context, client)
    return _reply(msg, {Key.ADVERTISEMENT: ad.to_dict()})


def _masked_input(
    msg: Message, context: Context, client: SecAggClient, payload: dict, call_next: ClientAppCallable
) -> Message:
    global_arrays = _single_global_model(msg)
    received_hash = model_hash(global_arrays)
    if client.context is None or received_hash != client.context.model_hash:
        raise ProtocolError(
            "the global model received differs from the one announced for the round "
            "(model-inconsistency attack?)"
        )
    ledger = _round_ledger(context)
    key = client.context.digest()
    if ledger is not None:
        ledger.check(key, client.context.server_round, client.opened_at)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local, metrics, weight, secret_keys = _train_reply(reply, client.context)
    noise = _distributed_dp_noise(msg, client.context, weight, context.node_config, metrics)
    limit = client.policy.max_cohort
    masked, bad, clipped = client.masked_input(
        _ids(payload, Key.SHARED, limit),
        _id_map(payload, Key.CIPHERTEXTS, limit),
        flat_update(local, global_arrays),
        weight,
        received_hash,
        metric_values=_masked_metric_values(metrics, secret_keys),
        noise=noise,
        min_inputs=_min_inputs(msg, client.context, noise),
    )
    if ledger is not None:
        ledger.advance(key, client.context.server_round, client.opened_at)  # durable before the input leaves
    _save_client(context, client)
    return _reply(msg, {Key.BAD_SENDERS: bad, Key.CLIPPED: clipped},
                  _masked_content(masked, metrics, secret_keys))


def _min_inputs(msg: Message, context: RoundContext, noise: np.ndarray | None) -> int:
    """With distributed DP noise in the input: the contributors it was scaled for (the
    client then refuses to sign a smaller survivor set); else 0."""
    if noise is None:
        return 0
    config = next(
        (r for name, r in msg.content.config_records.items() if name != SECAGG_RECORD), None
    )
    value = config.get(TrainConfig.DP_MIN_CONTRIBUTORS) if config is not None else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else len(context.cohort)


# Distributed DP: the client side (checks against the node's own floors, Skellam noise)
# is flwr_guard.dp.distributed_client; this mod only hands it the round's parameters.
def _distributed_dp_noise(msg: Message, context: RoundContext, weight: int,
                          node_config: dict, metrics: MetricRecord) -> np.ndarray | None:
    """Skellam noise for this client's quantised update (``None`` without distributed DP);
    raises ``ValueError`` for a request the node refuses (see ``dp/distributed_client.py``)."""
    config = next(
        (r for name, r in msg.content.config_records.items() if name != SECAGG_RECORD), None
    )
    params = context.params
    return distributed_dp_noise(
        config, node_config, weight=weight, cohort_size=len(context.cohort),
        update_length=context.update_length, clipping_range=params.clipping_range,
        quantization_range=params.quantization_range, modulus_bits=params.modulus_bits,
        metrics=metrics,
    )


__all__ = ["secaggplus_mod"]
