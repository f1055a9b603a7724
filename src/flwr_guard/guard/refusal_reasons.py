"""The clients' own reasons for a refusal, as the server sees them.

A guarded client that will not send its update replies with an error. Its reason may
come back in a train reply (the policy mod, the trap-model check, a failed audit, a
budget the train function found exhausted) or in a SecAgg+ protocol stage before any
model is sent (a cohort below the node's floor, no federation roster): the latter never
reaches the strategy's ``aggregate_train``. :class:`RefusalLog` watches the Grid (a thin
delegating wrapper) to keep the stage replies' reasons of the round, and
:func:`reason_of` turns an error reply into the client's sentence:

| reply error | reason kept |
| --- | --- |
| ``flwr-guard policy refused: …`` (policy, trap model, audit failure) | the text after the prefix |
| ``SecAgg+ refused: …`` (cohort floor, roster, parameters) | the whole text |
| a ClientApp exception named in :data:`REFUSING_EXCEPTIONS` | ``Name: message`` |

(A ClientApp exception arrives as Flower's ``<class '…'>:<'…'>`` or as ``Name: …``;
``PrivacyBudgetExceeded``'s message carries the epsilon spent, projected and allowed.)

Anything else (a crash, a timeout, the audit gate's or the reply inspector's blocks,
which their own summaries report) is not a refusal and keeps the generic hint.

Which reasons stop the run (:meth:`RefusalLog.refusals`, ``GuardMismatch`` unless
``tolerate_refusals``, when they are a majority of the clients the round asked:
:func:`refusals_stop_run`; fewer are left out, each with an ERROR line): policy
refusals, a missing or mismatched ledger (an operator's matter: the node cannot train
until it is fixed), and SecAgg+ refusals in the set-up
stages (advertise, roster, share-keys: the server's parameters or cohort do not meet
the node's floors). An exhausted budget does not stop the run: it is the budget doing
its job (the node will not train again), as Flower's own DP wrappers end training at
``max_epsilon``; the reason, with its numbers, is on the round's line and in
``NoAggregate`` when no round aggregated. A SecAgg+ refusal at or after the masked input (which
also wraps an inner mod's crash, or a lost session that the next round re-keys) is only
explained (:attr:`RefusalLog.last`), never a reason to stop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import Message
from flwr.serverapp import Grid

from flwr_guard.guard.client_mod import POLICY_REFUSAL
from flwr_guard.secagg.constants import SECAGG_RECORD, UNKNOWN_SESSION, Key, Stage

if TYPE_CHECKING:  # the SecAgg+ wrapper imports Flower's server side: only for the type
    from flwr_guard.secagg.strategy import SecAggPlus

SECAGG_REFUSAL = "SecAgg+ refused:"
#: Client-side exceptions that are a deliberate refusal, not a crash.
REFUSING_EXCEPTIONS = ("PrivacyBudgetExceeded", "LedgerMissing", "CheckpointMismatch")
#: The refusal that ends a node's training without stopping the run.
BUDGET_EXHAUSTED = "PrivacyBudgetExceeded"
#: What the server says when no client gave a reason.
GENERIC_HINT = "do the clients run ClientGuard(...).train_mods()?"


def reason_from_text(text: str) -> str | None:
    """The client's reason in an error reply's text, or ``None`` (see the table)."""
    text = str(text or "").strip()
    if text.startswith(POLICY_REFUSAL):
        return text[len(POLICY_REFUSAL):].strip()
    if text.startswith(SECAGG_REFUSAL):
        return text
    for name in REFUSING_EXCEPTIONS:
        at = text.find(name)
        if at >= 0:
            rest = text[at + len(name):].lstrip("'>:< ").rstrip("'> ")
            return f"{name}: {rest}"
    return None


def reason_of(reply: Message) -> str | None:
    """The client's reason if ``reply`` is a refusal, else ``None``."""
    if not reply.has_error():
        return None
    return reason_from_text(str(reply.error.reason))


def stops_run(reason: str, stage: str | None) -> bool:
    """Whether a refusal ``reason`` given at SecAgg+ ``stage`` (``None``: a plain train
    message) stops the run (see the module docstring)."""
    if reason.startswith(SECAGG_REFUSAL):
        return stage in Stage.SETUP and UNKNOWN_SESSION not in reason
    return not reason.startswith(BUDGET_EXHAUSTED)


class RefusalLog:
    """The round's refusal reasons by node, from train replies and SecAgg+ stages.

    Usage (in :class:`~flwr_guard.guard.strategy.GuardedStrategy`): ``grid =
    log.watch(grid)`` at the start of a run, ``log.refusals(replies)`` in each
    ``aggregate_train`` (it returns and forgets what the round's stages recorded).
    """

    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, bool]] = {}
        #: ``{node: reason}`` of the last round, stopping or not (for the round's line).
        self.last: dict[int, str] = {}
        #: The nodes sent a train message since the last :meth:`refusals` (this round's).
        self.asked: set[int] = set()
        #: How many nodes the last round asked (set by :meth:`refusals`).
        self.round_asked = 0

    def watch(self, grid: Grid) -> Grid:
        """``grid`` wrapped so that every error reply's reason is recorded."""
        self.pending, self.last = {}, {}
        return grid if isinstance(grid, _WatchedGrid) else _WatchedGrid(grid, self)

    def record(self, replies: Iterable[Message], destinations: dict[str, int],
               stages: dict[str, str]) -> None:
        for reply in replies:
            reason = reason_of(reply)
            if reason is not None:
                answered = reply.metadata.reply_to_message_id
                node = destinations.get(answered, reply.metadata.src_node_id)
                stage = stages.get(answered)
                self.pending.setdefault(int(node), (reason, stops_run(reason, stage)))

    def refusals(self, replies: Iterable[Message]) -> dict[int, str]:
        """``{node: reason}`` of this round's refusals that stop the run, from the
        replies and the SecAgg+ stages (then forgotten); every reason of the round,
        stopping or not, is kept in :attr:`last`."""
        found = dict(self.pending)
        self.pending = {}
        self.round_asked, self.asked = len(self.asked), set()
        for reply in replies:
            reason = reason_of(reply)
            if reason is not None:
                found[int(reply.metadata.src_node_id)] = (reason, stops_run(reason, Stage.MASKED_INPUT))
        self.last = {node: reason for node, (reason, _) in found.items()}
        return {node: reason for node, (reason, stops) in found.items() if stops}


def _round_size(server_round: int, refusals: dict[int, str], replies: list[Message],
                secagg: SecAggPlus | None, asked: int = 0) -> tuple[int, str | None]:
    """The number of clients asked this round (``asked``: the nodes sent a train message;
    the SecAgg+ cohort or the replies when larger) and the round's SecAgg+ abort reason."""
    reports = [r for r in getattr(secagg, "history", []) if r.server_round == server_round]
    cohort = reports[-1].cohort if reports else 0
    aborted = reports[-1].aborted if reports else None
    return max(len(replies), cohort or 0, len(refusals), asked), aborted


def refusals_stop_run(server_round: int, refusals: dict[int, str], replies: list[Message],
                      secagg: SecAggPlus | None = None, asked: int = 0) -> bool:
    """Whether the round's run-stopping refusals are a majority of the clients it asked
    (clients that timed out count as asked): a server that most of its federation refuses
    is misconfigured (:class:`GuardMismatch`). Half or fewer are left out with an ERROR
    line each: a client that refuses (or falsely claims to) cannot end the run for the
    others, one of two included."""
    total, _ = _round_size(server_round, refusals, replies, secagg, asked)
    return 2 * len(refusals) > total > 0


def mismatch_message(server_round: int, refusals: dict[int, str], replies: list[Message],
                     secagg: SecAggPlus | None = None, explained: dict[int, str] | None = None,
                     asked: int = 0) -> str:
    """The text of :class:`~flwr_guard.guard.round_log.GuardMismatch` for a round (with
    the SecAgg+ wrapper ``secagg``'s cohort and abort reason of the round, if any)."""
    total, aborted = _round_size(server_round, refusals, replies, secagg, asked)
    text = (f"round {server_round}: {len(refusals)} of {total} clients refused the server's "
            "protections; the server's GuardedStrategy must meet the clients' policies (or "
            "pass tolerate_refusals=True to go on without them). Their reasons: "
            + " | ".join(sorted(set(refusals.values()))))
    others = sorted(set(explained.values()) - set(refusals.values())) if explained else []
    if others:
        text += " (other clients said: " + " | ".join(others) + ")"
    if aborted:
        text += f" (SecAgg+: {aborted})"
    return text


def abort_reason(aborted: str, refusals: dict[int, str]) -> str:
    """A SecAgg+ abort with the clients' reasons; without any, the generic hint only when
    no client took part at all (an abort at advertise), else "lost or excluded"."""
    if refusals:
        return f"SecAgg+ aborted: {aborted}; the clients said: " + " | ".join(
            sorted(set(refusals.values())))
    if "aborted at advertise" in aborted:
        return f"SecAgg+ aborted: {aborted} ({GENERIC_HINT})"
    return f"SecAgg+ aborted: {aborted} (clients lost or excluded during the round)"


class _WatchedGrid(Grid):
    """Delegates everything to ``inner``; records the reasons of error replies."""

    def __init__(self, inner: Grid, log: RefusalLog) -> None:
        self._inner, self._log = inner, log
        self._destinations: dict[str, int] = {}
        self._stages: dict[str, str] = {}

    def _remember(self, messages: list[Message]) -> None:
        for msg in messages:
            if msg.metadata.message_type.split(".", 1)[0] == "train":
                self._log.asked.add(int(msg.metadata.dst_node_id))
            if msg.metadata.message_id:
                self._destinations[msg.metadata.message_id] = msg.metadata.dst_node_id
                record = msg.content.config_records.get(SECAGG_RECORD)
                stage = record.get(Key.STAGE) if record is not None else None
                if isinstance(stage, str):
                    self._stages[msg.metadata.message_id] = stage

    def __getattr__(self, name: str) -> Any:  # anything a Grid subclass adds
        return getattr(self._inner, name)

    @property
    def run(self) -> Any:
        return self._inner.run

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self) -> Any:  # a real Grid may say more than the base class's ids
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._inner.push_messages(messages))
        self._remember(messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        self._log.record(replies, self._destinations, self._stages)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        self._remember(messages)
        self._log.record(replies, self._destinations, self._stages)
        return replies
