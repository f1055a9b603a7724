"""Flower adapter: the client mod that enforces the client's :class:`ClientPolicy`.

``policy_mod(policy)`` goes first (outermost) in ``@app.train(mods=[...])``;
:meth:`~flwr_guard.guard.client.ClientGuard.train_mods` puts it there. For every train
message that carries the global model it

1. reads the server's :class:`~flwr_guard.guard.manifest.ProtectionManifest` from the
   train config (:data:`~flwr_guard.guard.manifest.MANIFEST_KEY`) and checks it, and the
   effective DP values in the config, against the policy;
2. checks the message itself: a client that requires SecAgg+ refuses a model sent in a
   plain train message, whatever the manifest says (a server that forgot the SecAgg+
   wrapper, or lies about it);
3. on the way out, refuses to send a reply that is not what the policy requires: an
   update in the clear when SecAgg+ is required, or one not trained under DP-SGD
   (:meth:`~flwr_guard.guard.client.ClientGuard.private_training`) when DP-SGD is.

Under the node guard (:mod:`flwr_guard.node`) the node masks the update outside the
app; the guard tells the app's process so (:mod:`flwr_guard.node.enforcement`, never
through the run config or the message), and checks 2 and 3's SecAgg+ parts step aside.

Each refusal is an error reply whose reason starts with :data:`POLICY_REFUSAL` and names
the fix; the update never leaves the client. SecAgg+ protocol stages other than the
masked input carry no model and no update and pass through to the SecAgg+ mod, which
enforces the SecAgg+ floors itself. Evaluate and query messages pass through.
"""

from __future__ import annotations

import logging
import secrets

from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import log
from flwr.common.constant import ErrorCode

from flwr_guard.guard.manifest import MANIFEST_KEY, ManifestError, ProtectionManifest
from flwr_guard.guard.policy import ClientPolicy
from flwr_guard.secagg.constants import MASKED_ARRAYS, SECAGG_RECORD, Stage  # light: no NumPy, no crypto

#: Every refusal's reason starts with this (the server's GuardedStrategy looks for it).
POLICY_REFUSAL = "flwr-guard policy refused:"
#: Where the mod and :meth:`ClientGuard.private_training` meet in ``context.state``.
STATE_RECORD = "flwr-guard.guard"
MASKED_INPUT_STAGE = Stage.MASKED_INPUT


def refusal(msg: Message, reason: str) -> Message:
    """An error reply to ``msg`` that says why the policy refused it (and log it)."""
    text = f"{POLICY_REFUSAL} {reason}"
    log(logging.ERROR, "%s", text)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=text), reply_to=msg)


def is_train(msg: Message) -> bool:
    """A train message: ``"train"`` or a named train action ``"train.<action>"``
    (Flower routes ``train.default`` to ``@app.train()`` too)."""
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _train_config(msg: Message) -> ConfigRecord | str:
    """The one train ConfigRecord of ``msg`` (besides the ``secagg`` one), or why not.

    Every mod inside (SecAgg+, clipping, distributed noise) reads *the* config: a second
    record would let a server show the policy one value and the mods another.
    """
    records = [(n, r) for n, r in msg.content.config_records.items() if n != SECAGG_RECORD]
    if len(records) > 1:
        return (f"the train message holds {len(records)} ConfigRecords "
                f"({', '.join(n for n, _ in records)}); a guarded client accepts exactly one")
    return records[0][1] if records else ConfigRecord()


def _secagg_stage(msg: Message) -> str | None:
    record = msg.content.config_records.get(SECAGG_RECORD)
    if record is None:
        return None
    stage = record.get("stage")
    return stage if isinstance(stage, str) else "?"


def issue_token(context: Context) -> str:
    """Start a train call: a fresh token that ``private_training`` must confirm."""
    token = secrets.token_hex(16)
    context.state[STATE_RECORD] = ConfigRecord({"token": token, "dpsgd": ""})
    return token


def confirm_dpsgd(context: Context) -> None:
    """Mark the current train call as trained under DP-SGD (``private_training`` calls it)."""
    record = context.state.config_records.get(STATE_RECORD)
    if record is None or not record.get("token"):
        raise RuntimeError(
            "private_training ran outside a guarded train call: add ClientGuard.train_mods() "
            "to @app.train(mods=...)"
        )
    record["dpsgd"] = record["token"]


def _dpsgd_confirmed(context: Context, token: str) -> bool:
    record = context.state.config_records.get(STATE_RECORD)
    return record is not None and record.get("dpsgd") == token


def _node_masks() -> bool:
    """Whether this app runs under the node guard and the node masks this reply."""
    from flwr_guard.node.enforcement import node_enforcement

    enforced = node_enforcement()
    return enforced is not None and enforced.secagg_masked


def policy_mod(policy: ClientPolicy) -> Mod:
    """Build the mod that enforces ``policy`` (see the module docstring).

    Args:
        policy: what the app requires; the node operator's node-config policy
            (:meth:`ClientPolicy.from_node_config`) is added on top, the stricter wins.

    Returns:
        A Flower mod ``(msg, context, call_next) -> Message``.
    """

    app_policy = policy

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_train(msg):
            return call_next(msg, context)
        try:
            policy = app_policy.with_node_config(context.node_config)
        except ValueError as err:
            return refusal(msg, f"invalid node-config policy: {err}")
        stage = _secagg_stage(msg)
        arrays = len(msg.content.array_records)
        if stage is not None and stage != MASKED_INPUT_STAGE:
            if arrays:
                return refusal(msg, f"a SecAgg+ {stage!r} stage message carries arrays")
            return call_next(msg, context)  # a SecAgg+ control stage: no model, no update
        if arrays != 1:
            return refusal(
                msg, f"the train message holds {arrays} ArrayRecords; a guarded client trains "
                "on exactly one, the model the round announces")
        config = _train_config(msg)
        if isinstance(config, str):
            return refusal(msg, config)
        value = config.get(MANIFEST_KEY)
        if value is None:
            if policy.requires_anything:
                return refusal(
                    msg,
                    "the server sent no protection manifest, so this client cannot tell what "
                    f"protects its update (it requires {', '.join(policy.required())}): run the "
                    "server's strategy inside flwr_guard.GuardedStrategy",
                )
            return call_next(msg, context)
        try:
            manifest = ProtectionManifest.parse(value)
        except ManifestError as err:
            return refusal(msg, f"invalid protection manifest: {err}")
        problems = policy.check(manifest, config)
        # Under the node guard the node's SecAgg+ mod masks this reply outside the app
        # (a marker only the guard's pipe sets: flwr_guard.node.enforcement).
        node_masks = _node_masks()
        if stage is None and not node_masks and (policy.secagg or manifest.has("secagg")):
            problems.append(
                "the global model came in a plain train message, not in a SecAgg+ round"
                + (" although the manifest announces SecAgg+" if manifest.has("secagg") else "")
                + ": this client sends its update only masked (run SecAgg+ on the server: "
                "GuardedStrategy(..., secagg=SecAgg(...)))"
            )
        if problems:
            return refusal(msg, "; ".join(problems))
        token = issue_token(context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if len(reply.content.array_records) > 1:
            return refusal(msg, "the reply holds more than one ArrayRecord: nothing is sent")
        if policy.dpsgd and not _dpsgd_confirmed(context, token):
            return refusal(
                msg,
                "this client requires DP-SGD but the train function did not train under "
                "ClientGuard.private_training(...): the update is not sent",
            )
        if policy.secagg and not node_masks:
            clear = [name for name in reply.content.array_records if name != MASKED_ARRAYS]
            if clear:
                return refusal(
                    msg,
                    f"the reply would carry arrays {clear} in the clear although SecAgg+ is "
                    "required: put the SecAgg+ mod inside the policy mod "
                    "(use ClientGuard.train_mods())",
                )
        return reply

    return mod
