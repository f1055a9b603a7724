"""Flower adapter: the client refuses a received model that is malformed or a trap.

Runs on every train message that carries the global model (under SecAgg+: the
masked-input stage), *before* training: the weights must be finite and fit the app's
architecture (``load_state_dict(strict=True)``), and the trap-model check
(:mod:`flwr_guard.audit.trap_check`) must not find a layer that reveals records through
aggregation. A refusal is an error reply whose reason starts with
:data:`flwr_guard.guard.client_mod.POLICY_REFUSAL`, so that it reaches the server's log
and :class:`~flwr_guard.guard.round_log.GuardMismatch`; nothing is trained or sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from torch import nn

from flwr_guard.audit.inputs import as_pair, prepare
from flwr_guard.audit.sampling import derived_seed
from flwr_guard.audit.trap_check import TrapCheckConfig, check_model, nonfinite_weights
from flwr_guard.guard.client_mod import refusal
from flwr_guard.records import first_array_record, message_kind, server_round

logger = logging.getLogger(__name__)

#: Every reason of this mod starts so (after the policy prefix).
TRAP_REASON = "received model refused:"


def received_model(msg: Message, model_fn: Callable[[], nn.Module]) -> nn.Module | str:
    """The app's model with the message's weights, or why they cannot be accepted."""
    arrays = first_array_record(msg.content)
    if arrays is None:
        return "the train message carries no single ArrayRecord (global model)"
    try:
        state = arrays.to_torch_state_dict()
    except Exception as err:  # malformed arrays: any failure is a refusal
        return f"the model's arrays cannot be read ({type(err).__name__}: {str(err)[:200]})"
    bad = nonfinite_weights(state)
    if bad:
        return f"NaN or infinite weights in {bad[:5]}"
    model = model_fn()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # one line for the server's log
        return f"the weights do not fit {type(model).__name__}: {detail[:300]}"
    return model


def trap_check_mod(
    model_fn: Callable[[], nn.Module],
    data_fn: Callable[[Context], Any],
    config: TrapCheckConfig | None = None,
    *,
    input_key: str | None = None,
    target_key: str | None = None,
    modality: str = "auto",
    seed: int = 0,
) -> Mod:
    """Build the mod (see the module docstring); put it inside the SecAgg+ mod.

    Args:
        model_fn: the app's architecture.
        data_fn: the client's data (:func:`flwr_guard.audit.inputs.as_pair` forms).
        config: the check's settings.
        input_key, target_key, modality: as for the leakage audit.
        seed: with the round and node id, picks the probed records.
    """
    config = config or TrapCheckConfig()

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message_kind(msg) != "train" or not msg.content.array_records:
            return call_next(msg, context)
        model = received_model(msg, model_fn)
        if isinstance(model, str):
            return refusal(msg, f"{TRAP_REASON} malformed model: {model}")
        rnd = server_round(msg)
        try:
            x, y = as_pair(data_fn(context), input_key, target_key)
            data = prepare(x, y, modality)
            with torch.enable_grad():
                finding = check_model(model, data, config, derived_seed(seed, rnd, context.node_id))
        except Exception as err:  # a check that cannot run never lets the model through
            return refusal(msg, f"{TRAP_REASON} the trap-model check cannot run on this app: "
                           f"{type(err).__name__}: {str(err)[:300]}")
        logger.info("trap-model check round %d: %s (%.3f s)", rnd, finding.reason, finding.seconds)
        if finding.trapped:
            return refusal(msg, f"{TRAP_REASON} {finding.reason}")
        return call_next(msg, context)

    return mod
