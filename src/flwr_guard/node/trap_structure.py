"""Flower adapter: the node guard refuses a received model with a trap's structure.

The app's own trap-model check (``ClientGuard(audit=LeakageAudit(...))``,
:mod:`flwr_guard.audit.trap_mod`) needs the app's architecture and data; a FAB can leave
it out. Around any app, the node guard runs what can be checked on the received arrays
alone (:func:`flwr_guard.audit.trap_check.structural_findings`: NaN or infinite values,
and a weight matrix with ``min_group_rows`` or more rows of one direction, the
signature of an imprint / binning layer, Fowl et al., ICLR 2022) on the model of every
train message, *before* the app trains on it. Under SecAgg+ that is the
``masked-input`` stage (this mod sits inside the node's SecAgg+ mod, which hands it the
model); control stages carry no arrays and pass.

A finding is an error reply whose reason starts with
:data:`~flwr_guard.guard.client_mod.POLICY_REFUSAL` and
:data:`~flwr_guard.audit.trap_mod.TRAP_REASON`, as the app's own check words it, so it
reaches the server's log (the SecAgg+ strategy names the node and its reason) and the
node's round line; nothing is trained or sent. Not caught here (docs/audit.md): trap
weights with random rows, imprints behind a convolution or other mixing layer, attacks
spread over rounds; the app's behavioural check finds more where the app runs it.

Node config: ``guard-trap-check`` (default ``true``) turns it off with ``false``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from flwr_guard.guard.client_mod import is_train, refusal
from flwr_guard.keys import NodeConfig

#: Node config: ``false`` turns the node's structural trap check off.
NODE_TRAP_CHECK = NodeConfig.GUARD_TRAP_CHECK


def structural_trap_mod(min_group_rows: int = 3) -> Mod:
    """Build the mod (see the module docstring).

    Args:
        min_group_rows: rows of one direction that make a finding (>= 2; the app-side
            check's default, :class:`flwr_guard.audit.trap_check.TrapCheckConfig`).
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_train(msg) or not msg.content.array_records:
            return call_next(msg, context)
        from flwr_guard.audit.trap_check import structural_findings

        arrays: dict[str, object] = {}
        for record_name, record in msg.content.array_records.items():
            for key, array in record.items():
                arrays[key if len(msg.content.array_records) == 1 else f"{record_name}/{key}"] = (
                    array.numpy())
        findings = structural_findings(arrays, min_group_rows)
        if findings:
            from flwr_guard.audit.trap_mod import TRAP_REASON

            return refusal(msg, f"{TRAP_REASON} {'; '.join(findings)} (the node guard's "
                           f"structural trap check, node config {NODE_TRAP_CHECK})")
        return call_next(msg, context)

    return mod
