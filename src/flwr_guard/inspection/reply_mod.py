"""Client mod that inspects the outgoing reply before it leaves the device.

Usage::

    @app.train(mods=[secaggplus_mod, reply_inspection_mod(), leakage_audit_mod(...), clipping_mod])
    @app.evaluate(mods=[reply_inspection_mod()])

It compares the reply with the message it answers (the global model's keys, shapes and
dtypes for train; no arrays for evaluate) using
:func:`flwr_guard.inspection.reply.inspect_reply`. Policy ``"block"`` (default)
replaces an offending reply by an error reply (``ErrorCode.MOD_FAILED_PRECONDITION``,
reason starting with :data:`BLOCKED_REASON` and listing the findings without their
values), which Flower's strategies skip; ``"flag"`` logs the findings and sends the
reply unchanged.
"""

from __future__ import annotations

import logging
from typing import Literal

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from flwr_guard.inspection.reply import Finding, ReplyLimits, inspect_reply
from flwr_guard.records import (
    BLOCK_PREFIX,
    array_shapes,
    first_array_record,
    message_kind,
    plain_content,
)

logger = logging.getLogger(__name__)

BLOCKED_REASON = f"{BLOCK_PREFIX} reply inspection: reply blocked"
Policy = Literal["block", "flag"]


def findings_for(msg: Message, reply: Message, limits: ReplyLimits) -> list[Finding]:
    """Findings of ``reply`` answering ``msg`` (train: against the sent model)."""
    declared = None
    if message_kind(msg) == "train":
        sent = first_array_record(msg.content)
        declared = array_shapes(sent) if sent is not None else {}
    view = plain_content(reply.content)
    return inspect_reply(declared, view["arrays"], view["metrics"], view["configs"], limits)


def reply_inspection_mod(policy: Policy = "block", limits: ReplyLimits | None = None) -> Mod:
    """Build the reply-inspection mod.

    Args:
        policy: ``"block"`` (error reply instead of an offending one) or ``"flag"``
            (log and send).
        limits: the inspector's thresholds.

    Raises:
        ValueError: for an unknown policy.
    """
    if policy not in ("block", "flag"):
        raise ValueError(f"policy must be 'block' or 'flag', got {policy!r}")
    limits = limits or ReplyLimits()

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error() or message_kind(msg) not in ("train", "evaluate"):
            return reply
        found = findings_for(msg, reply, limits)
        if not found:
            return reply
        summary = "; ".join(str(f) for f in found[:10])
        if len(found) > 10:
            summary += f"; ... ({len(found)} findings)"
        if policy == "flag":
            logger.warning("reply inspection: %s", summary)
            return reply
        reason = f"{BLOCKED_REASON}: {summary}"
        logger.warning(reason)
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)

    return mod
