"""Client mod: run the client side of SecAgg+ around the user's ``@app.train``.

Usage::

    from flwr_guard.secagg import secaggplus_mod

    @app.train(mods=[secaggplus_mod])
    def train(msg, context): ...

The server side (:class:`~flwr_guard.secagg.strategy.SecAggPlus`) sends five kinds of
train message, told apart by the ``secagg`` ConfigRecord. Four are protocol stages that
this mod answers itself; the ``masked-input`` one carries the global model, is passed
to the user's function, and its reply is turned into a masked integer vector: the
update ``reply arrays - global arrays``, quantised, weighted by ``num-examples`` and
masked. Only masked integers leave the device for the model. ``num-examples`` and the
integer metrics the server names in ``masked_metrics`` travel masked too (only their
sums are revealed); the reply's other metrics travel in the clear.

Place this mod first (outermost) in the list: the protocol stages are answered here
and never reach the mods inside it.

State between stages lives in ``context.state`` (the node's own storage): a SuperNode
starts a new ClientApp process for every message. The node's long-term Ed25519 key is
created there on first use, and peers' signing keys are pinned there (trust on first
use); a changed key is refused in later rounds.
"""

from __future__ import annotations

import logging
import math
import secrets

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

from flwr_guard.dp.distributed_client import distributed_dp_noise
from flwr_guard.secagg import codec, crypto
from flwr_guard.secagg.arrays import flat_update, model_hash
from flwr_guard.secagg.client import (
    ProtocolError,
    SecAggClient,
    unpack_advertisements,
    unpack_roster,
)
from flwr_guard.secagg.context import RoundContext

logger = logging.getLogger(__name__)

SECAGG_RECORD = "secagg"
STATE_RECORD = "flwr-guard.secagg"
MASKED_ARRAYS = "masked"
WEIGHT_KEY = "num-examples"
STAGES = ("advertise", "share-keys", "masked-input", "consistency", "unmask")


def _error(msg: Message, reason: str) -> Message:
    logger.error("SecAgg+ mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _reply(msg: Message, payload: dict, extra: RecordDict | None = None) -> Message:
    content = extra if extra is not None else RecordDict()
    content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(payload)})
    return Message(content=content, reply_to=msg)


def _signing_secret(context: Context) -> bytes:
    state = context.state.config_records.get(STATE_RECORD)
    if state is None or "signing-secret" not in state:
        secret, _ = crypto.ed25519_keypair()
        record = ConfigRecord({"signing-secret": secret})
        context.state[STATE_RECORD] = record
        return secret
    return bytes(state["signing-secret"])


def _load_client(context: Context) -> SecAggClient:
    signing = _signing_secret(context)
    saved = context.state[STATE_RECORD].get("round")
    if saved is None:
        raise ProtocolError("no SecAgg+ round in progress on this client")
    return SecAggClient.from_state(codec.decode(bytes(saved)), signing)


def _save_client(context: Context, client: SecAggClient) -> None:
    context.state[STATE_RECORD]["round"] = codec.encode(client.to_state())


def _pinned(context: Context) -> dict[int, bytes]:
    saved = context.state.config_records.get(STATE_RECORD, ConfigRecord()).get("round")
    if saved is None:
        return {}
    return {int(p): bytes(k) for p, k in codec.decode(bytes(saved)).get("pinned_keys", [])}


def secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod for SecAgg+ (see the module docstring).

    Messages without a ``secagg`` ConfigRecord, and non-train messages, pass through
    untouched. A stage that the client refuses (:class:`ProtocolError`) or cannot
    handle (malformed message, wrong shapes, NaN/Inf update) is answered with an
    error reply; the server then counts this client as dropped.
    """
    if msg.metadata.message_type != MessageType.TRAIN or SECAGG_RECORD not in msg.content:
        return call_next(msg, context)
    try:
        record = msg.content.config_records[SECAGG_RECORD]
        stage = str(record["stage"])
        payload = codec.decode(bytes(record["payload"]))
        if stage == "advertise":
            return _advertise(msg, context, payload)
        client = _load_client(context)
        if stage == "share-keys":
            # The roster of U1 (graph, pinned keys) + the neighbours' advertisements.
            roster = unpack_roster(codec.field(payload, "roster", bytes))
            ads = unpack_advertisements(codec.field(payload, "advertisements", bytes))
            out = client.share_keys(ads, roster)
            _save_client(context, client)
            return _reply(msg, {"ciphertexts": {str(k): v for k, v in out.items()}})
        if stage == "masked-input":
            return _masked_input(msg, context, client, payload, call_next)
        if stage == "consistency":
            signature = client.consistency([int(i) for i in codec.field(payload, "survivors", list)])
            _save_client(context, client)
            return _reply(msg, {"signature": signature})
        if stage == "unmask":
            shares = client.unmask(
                [int(i) for i in codec.field(payload, "active", list)],
                [int(i) for i in codec.field(payload, "dropped", list)],
                {int(k): v for k, v in codec.field(payload, "signatures", dict).items()},
            )
            _save_client(context, client)
            return _reply(
                msg, {"shares": {str(p): [kind, i, s] for p, (kind, i, s) in shares.items()}}
            )
        return _error(msg, f"unknown SecAgg+ stage {stage!r}")
    except (ProtocolError, ValueError, KeyError, TypeError) as err:
        return _error(msg, f"SecAgg+ refused: {err}")


def _advertise(msg: Message, context: Context, payload: dict) -> Message:
    round_context = RoundContext.from_dict(codec.field(payload, "context", dict))
    if round_context.run_id != msg.metadata.run_id:
        raise ProtocolError("round context names another run")
    client = SecAggClient(context.node_id, _signing_secret(context), pinned_keys=_pinned(context))
    ad = client.advertise(round_context)
    _save_client(context, client)
    return _reply(msg, {"advertisement": ad.to_dict()})


def _masked_input(
    msg: Message, context: Context, client: SecAggClient, payload: dict, call_next: ClientAppCallable
) -> Message:
    global_record = next(iter(msg.content.array_records.values()))
    global_arrays = {k: v.numpy() for k, v in global_record.items()}
    received_hash = model_hash(global_arrays)
    if client.context is None or received_hash != client.context.model_hash:
        raise ProtocolError(
            "the global model received differs from the one announced for the round "
            "(model-inconsistency attack?)"
        )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
        raise ValueError("the train reply must hold one ArrayRecord and one MetricRecord")
    local = {k: v.numpy() for k, v in next(iter(reply.content.array_records.values())).items()}
    metrics = next(iter(reply.content.metric_records.values()))
    if WEIGHT_KEY not in metrics:
        raise ValueError(f"the train reply's MetricRecord lacks {WEIGHT_KEY!r}")
    weight = int(metrics[WEIGHT_KEY])
    secret_keys = client.context.masked_metrics
    missing = [k for k in secret_keys if k not in metrics]
    if missing:
        raise ValueError(f"the train reply's MetricRecord lacks masked metrics {missing}")
    noise = _distributed_dp_noise(msg, client.context, weight, context.node_config, metrics)
    masked, bad, clipped = client.masked_input(
        [int(i) for i in codec.field(payload, "shared", list)],
        {int(k): v for k, v in codec.field(payload, "ciphertexts", dict).items()},
        flat_update(local, global_arrays),
        weight,
        received_hash,
        metric_values=[metrics[k] for k in secret_keys],
        noise=noise,
    )
    _save_client(context, client)
    plain = MetricRecord(
        {k: v for k, v in metrics.items() if k != WEIGHT_KEY and k not in secret_keys}
    )
    content = RecordDict(
        {MASKED_ARRAYS: ArrayRecord(numpy_ndarrays=[masked]), "metrics": plain}
    )
    return _reply(msg, {"bad_senders": bad, "clipped": clipped}, content)


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


__all__ = ["secaggplus_mod", "SECAGG_RECORD", "STAGES"]
