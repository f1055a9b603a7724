"""Server strategy wrapper: SecAgg+ around any ``flwr.serverapp.strategy`` strategy.

Usage::

    from flwr_guard.secagg import SecAggPlus

    strategy = SecAggPlus(FedAvg(...), num_shares=..., reconstruction_threshold=...)
    strategy.start(grid, initial_arrays, num_rounds=...)

The wrapped strategy samples the cohort and builds the train messages as usual
(``configure_train``). With ``multi_round=True`` (the default) the wrapper sets keys up
once for a cohort (advertise, roster) and, while each round's sampled cohort stays
within it, sends each round only the train message (the ``masked-input`` stage),
then, in ``aggregate_train``, the consistency and unmask stages
(:mod:`flwr_guard.secagg.session_client`: three messages per client per round). With
``multi_round=False`` every round runs the per-round protocol: advertise, roster
(the clients check every roster entry and reveal their graph nonces), share-keys, the
train messages with the routed encrypted shares, consistency and unmask. Either way
the wrapper removes the masks and hands the wrapped strategy **one** reply holding the
weighted average of the survivors' models (global + mean update) and their total
``num-examples``. FedAvg, FedProx and FedAdam (whose server optimiser works on
``aggregate - current``) thus behave as without SecAgg+, on an aggregate the server
computed without seeing any client's update.

Per-stage durations, bytes and dropouts of each round are kept in :attr:`history`
(for telemetry and the demo summary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_guard.keys import ServerMetrics
from flwr_guard.secagg import codec
from flwr_guard.secagg.arrays import apply_flat_update, model_hash, num_values
from flwr_guard.secagg.constants import (
    MASKED_ARRAYS,
    SECAGG_RECORD,
    UNKNOWN_SESSION,
    WEIGHT_KEY,
    Key,
    Stage,
)
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.messages import (
    Advertisement,
    RoundInput,
    RoundReveal,
    pack_advertisements,
    pack_nonces,
    pack_open,
    pack_roster,
)
from flwr_guard.secagg.params import (
    DEFAULT_CORRUPT_FRACTION,
    DEFAULT_DROPOUT_FRACTION,
    DEFAULT_MAX_WEIGHT,
    SecAggParams,
)
from flwr_guard.secagg.quantization import centered_lift, dequantize_mean
from flwr_guard.secagg.server import NonceWithheld, SecAggAborted, SecAggServer
from flwr_guard.secagg.session_server import SessionServer
from flwr_guard.secagg.transport import send_and_receive
from flwr_guard.strategy_wrapper import StrategyWrapper

logger = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one SecAgg+ round did: cohort, dropouts, per-stage seconds and bytes."""

    server_round: int
    cohort: int = 0
    survivors: int = 0
    num_shares: int = 0
    reconstruction_threshold: int = 0
    modulus_bits: int = 0
    dropouts: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_to_clients: dict[str, int] = field(default_factory=dict)
    bytes_from_clients: dict[str, int] = field(default_factory=dict)
    clipped_values: int = 0
    wraparounds: int = 0
    aborted: str | None = None
    multi_round: bool = False
    key_setup: bool = True
    setup_attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _add_dropouts(report: RoundReport, lost: dict[str, int]) -> None:
    """Add ``lost`` (stage -> clients) to the report's dropouts (set-ups may repeat)."""
    for stage, count in lost.items():
        report.dropouts[stage] = report.dropouts.get(stage, 0) + count


def _reply_items(cohort: int) -> int:
    """Most structural JSON tokens the server decodes in one client's control reply:
    a reply holds O(k) entries of at most 4 values each (k < cohort)."""
    return 16 * cohort + 256


MAX_REPLY_BYTES = 4 * 2**20
"""Largest control payload the server decodes from one client (a reply holds O(k)
fields of at most 100 bytes each)."""


def _node_id(key: object) -> int:
    """A node id sent as a decimal string key.

    Raises:
        ValueError: anything else (no ``int()`` of a 1 MB string).
    """
    if not (isinstance(key, str) and key.isdigit() and len(key) <= 20 and int(key) < 2**64):
        raise ValueError(f"not a node id: {str(key)[:30]!r}")
    return int(key)


_T = TypeVar("_T")


def _destinations(messages: list[Message]) -> dict[str, int]:
    """Message id -> destination node of messages already pushed (Flower sets the ids)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def _reply_node(reply: Message, destinations: dict[str, int]) -> int:
    """The node a reply is about: its sender, except for an error reply, which may come
    from the SuperLink (node 1) for a lost node: then the destination of the message it
    answers."""
    if reply.has_error():
        return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
    return reply.metadata.src_node_id


def _signature(payload: dict) -> bytes:
    return codec.field(payload, Key.SIGNATURE, bytes)


def _clipped(meta: dict, update_length: int) -> int:
    """A client's count of clipped coordinates, if it is one (0 otherwise): an integer
    in ``[0, update_length]``; counted only for inputs that end up in the sum."""
    value = meta.get(Key.CLIPPED, 0)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= update_length:
        return value
    return 0


def _reveal(payload: dict) -> RoundReveal:
    """A session round's unmask reply: seed, ``{peer: [index, share]}``, ``{peer: seed}``.

    Raises:
        ValueError: another shape or type (the server core checks sizes and relations).
    """
    shares = {}
    for key, item in codec.field(payload, Key.SHARES, dict).items():
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int)
                or isinstance(item[0], bool) or not isinstance(item[1], bytes)):
            raise ValueError("a revealed share must be [index, bytes]")
        shares[_node_id(key)] = (item[0], item[1])
    pair_seeds = {_node_id(k): v for k, v in codec.field(payload, Key.PAIR_SEEDS, dict).items()}
    bad = codec.field(payload, Key.BAD_SENDERS, list)
    return RoundReveal(codec.field(payload, Key.SEED, bytes), shares, pair_seeds,
                       [b for b in bad if isinstance(b, int) and not isinstance(b, bool)][:1000],
                       _optional_bytes(payload, Key.REVEAL_SIGNATURE))


def _optional_bytes(payload: dict, name: str) -> bytes:
    """``payload[name]`` if it is bytes, ``b""`` if absent (an empty signature never
    verifies: the core excludes the sender wherever it needs the signature).

    Raises:
        ValueError: present but not bytes.
    """
    value = payload.get(name, b"")
    if not isinstance(value, bytes):
        raise ValueError(f"{name} must be bytes")
    return value


def _recovered(payload: dict) -> dict[int, bytes]:
    """An ``unmask-recover`` reply: ``{culprit: pair seed}`` (sizes checked by the core).

    Raises:
        ValueError: another shape or type.
    """
    return {_node_id(k): v for k, v in codec.field(payload, Key.RECOVERED, dict).items()}


def _share(item: object) -> tuple[str, int, bytes]:
    """One revealed share ``[kind, index, 32 bytes]``.

    Raises:
        ValueError: another shape or type.
    """
    if not isinstance(item, list) or len(item) != 3:
        raise ValueError("a revealed share must be [kind, index, share]")
    kind, index, share = item
    if (not isinstance(kind, str) or not isinstance(index, int) or isinstance(index, bool)
            or not isinstance(share, bytes) or len(share) != 32):
        raise ValueError("a revealed share must be [kind, index, 32 bytes]")
    return kind, index, share


# Coordinates of the unmasked sum that wrapped around the modulus (see centered_lift).
WRAPAROUNDS_KEY = ServerMetrics.SECAGG_WRAPAROUNDS

UNMASK_COMPUTE = "unmask-compute"
"""Key of :attr:`RoundReport.stage_seconds` for the server's own work of removing the
masks (not a stage: no message is sent)."""


def _payload_bytes(message: Message) -> int:
    size = 0
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            size += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            size += sum(len(v) for v in record.values() if isinstance(v, bytes))
    return size


class SecAggPlus(StrategyWrapper):
    """SecAgg+ (Bonawitz et al. CCS 2017; Bell et al. CCS 2020) for a Message-API strategy.

    Args:
        strategy: the wrapped strategy (FedAvg, FedProx, FedAdam, ...); its
            ``weighted_by_key`` must be ``"num-examples"``.
        num_shares: k, neighbours per client; default from the cohort size by Bell et
            al.'s parameter choice (:func:`~flwr_guard.secagg.params.choose_parameters`).
        reconstruction_threshold: t; default floor((k + c)/2) + 1 for the default
            corrupt fraction (:func:`~flwr_guard.secagg.params.choose_parameters`).
            Each client refuses a t below its own policy's (2t > k + c).
        clipping_range: r; update coordinates are clipped to ``[-r, r]``.
        quantization_range: L; one quantisation step is ``2r / L``.
        max_weight: the largest ``num-examples`` a client may report (default 2048).
            With ``quantization_range`` L it sets the modulus: 32-bit while
            ``n * max_weight * L < 2^32``, else 64-bit (twice the upload; logged as a
            warning naming the ``max_weight`` that would keep 32 bits).
        timeout: seconds to wait for the replies of each stage; late clients count as
            dropped.
        corrupt_fraction, dropout_fraction: gamma and delta for the default k and t
            (:func:`~flwr_guard.secagg.params.choose_parameters`); use the clients'
            ``secagg-corrupt-fraction`` (a client refuses a t below what its own gamma
            needs).
        max_colluders: C, the absolute colluder bound the default t is chosen for; use
            the clients' ``secagg-max-colluders``. ``None``: ``ceil(corrupt_fraction x
            connected nodes)``, which matches clients whose roster lists those nodes.
        masked_metrics: integer client metrics (counts, bits in ``[0, max_weight]``)
            that travel masked; the wrapped strategy receives their sum over the
            survivors (e.g. ``("dp-weight", "dp-unclipped-count")`` for DP-FedAvg with
            adaptive clipping). The other metrics travel in the clear and reach the
            wrapped strategy as their unweighted mean over the survivors.

        max_setup_attempts: key set-ups per round when members withhold their graph
            nonce at the roster stage (each new set-up leaves them out; see
            :meth:`_key_setup`).
        recover_culprits: in a session round where a client provably revealed a wrong
            pair seed (its signed reveal contradicts its signed commitment), run the
            ``unmask-recover`` stage: its honest neighbours check the proof and reveal
            their pair seeds with it, its input is taken out and the round completes
            with the others. ``False``: the round aborts, naming the culprit (the
            behaviour before this stage existed).

    Clients must run :func:`~flwr_guard.secagg.mod.secaggplus_mod` on their train
    messages. A round that cannot complete (too many dropouts) leaves the model
    unchanged and is logged; the run goes on.
    """

    def __init__(
        self,
        strategy: Strategy,
        num_shares: int | None = None,
        reconstruction_threshold: int | None = None,
        clipping_range: float = 2.0,
        quantization_range: int = 2**16,
        max_weight: int = DEFAULT_MAX_WEIGHT,
        timeout: float = 300.0,
        masked_metrics: Sequence[str] = (),
        corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
        dropout_fraction: float = DEFAULT_DROPOUT_FRACTION,
        multi_round: bool = True,
        max_session_rounds: int = 100,
        max_colluders: int | None = None,
        max_setup_attempts: int = 3,
        recover_culprits: bool = True,
    ) -> None:
        super().__init__(strategy)
        if getattr(strategy, "weighted_by_key", WEIGHT_KEY) != WEIGHT_KEY:
            raise ValueError(f"SecAggPlus weights by {WEIGHT_KEY!r}; the wrapped strategy must too")
        self.num_shares = num_shares
        self.reconstruction_threshold = reconstruction_threshold
        self.clipping_range = clipping_range
        self.quantization_range = quantization_range
        self.max_weight = max_weight
        self.timeout = timeout
        self.masked_metrics = tuple(masked_metrics)
        self.corrupt_fraction = corrupt_fraction
        self.dropout_fraction = dropout_fraction
        self.max_colluders = max_colluders
        if max_session_rounds < 1:
            raise ValueError(f"max_session_rounds must be >= 1, got {max_session_rounds}")
        if max_setup_attempts < 1:
            raise ValueError(f"max_setup_attempts must be >= 1, got {max_setup_attempts}")
        self.multi_round = multi_round
        self.max_session_rounds = max_session_rounds
        self.max_setup_attempts = max_setup_attempts
        self.recover_culprits = recover_culprits
        self._items = _reply_items(2)
        self._rekey: str | None = None  # why the next round must set keys up again
        self._lost: set[int] = set()  # session members that lost their session
        self._setup_silent: set[int] = set()  # sampled, but not in the last set-up's U1
        self.history: list[RoundReport] = []
        self._round: dict[str, Any] | None = None
        self._session: SessionServer | None = None

    def summary(self) -> None:
        logger.info(
            "SecAgg+ (num_shares=%s, reconstruction_threshold=%s, clipping_range=%s, "
            "quantization_range=%s) around:",
            self.num_shares or "auto",
            self.reconstruction_threshold or "auto",
            self.clipping_range,
            self.quantization_range,
        )
        self.strategy.summary()

    # -- helpers -------------------------------------------------------------------
    def _exchange(
        self, grid: Grid, report: RoundReport, stage: str, payloads: dict[int, dict], server_round: int,
        contents: dict[int, RecordDict] | None = None,
    ) -> dict[int, Message]:
        """Send one stage's message to each node; return the non-error replies by node."""
        started = time.monotonic()
        messages = []
        for node, payload in payloads.items():
            content = contents[node] if contents else RecordDict()
            content[SECAGG_RECORD] = ConfigRecord(
                {Key.STAGE: stage, Key.SERVER_ROUND: server_round, Key.PAYLOAD: codec.encode(payload)}
            )
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        report.bytes_to_clients[stage] = sum(_payload_bytes(m) for m in messages)
        replies = send_and_receive(grid, messages, timeout=self.timeout)
        destinations = _destinations(messages)
        good: dict[int, Message] = {}
        for reply in replies:
            node = _reply_node(reply, destinations)
            if reply.has_error():
                logger.warning("SecAgg+ %s: node %s replied with an error: %s", stage, node, reply.error.reason)
            elif node in payloads:
                good[node] = reply
        report.bytes_from_clients[stage] = sum(_payload_bytes(m) for m in good.values())
        report.stage_seconds[stage] = round(time.monotonic() - started, 4)
        return good


    def _context(
        self, grid: Grid, server_round: int, cohort: list[int], global_arrays: dict[str, np.ndarray],
        report: RoundReport, multi_round: bool,
    ) -> RoundContext:
        """The round (or session set-up) context; raises SecAggAborted below 2 clients."""
        if len(cohort) < 2:
            raise SecAggAborted(f"SecAgg+ needs at least 2 clients, {len(cohort)} sampled")
        params = SecAggParams.for_cohort(
            len(cohort), self.num_shares, self.reconstruction_threshold,
            self.clipping_range, self.quantization_range, self.max_weight,
            corrupt_fraction=self.corrupt_fraction, dropout_fraction=self.dropout_fraction,
            max_colluders=self.max_colluders, federation_size=len(list(grid.get_node_ids())),
        )
        report.num_shares = params.num_shares
        report.reconstruction_threshold = params.reconstruction_threshold
        report.modulus_bits = params.modulus_bits
        return RoundContext(
            grid.run.run_id, server_round, tuple(cohort), params,
            num_values(global_arrays) + len(self.masked_metrics) + 1,
            model_hash(global_arrays), self.masked_metrics, multi_round=multi_round,
        )

    def _key_setup(self, grid: Grid, report: RoundReport, context: RoundContext, server_round: int,
                   global_arrays: dict[str, np.ndarray]) -> SecAggServer:
        """Advertise and roster stages: U1's signed keys, then every member's graph nonce.

        A member silent or malformed at the roster stage (no nonce, or one that does
        not match its commitment) is left out *before any share exists*: the set-up
        starts again, fresh keys and nonces, with the members that revealed (at most
        ``max_setup_attempts`` set-ups per round, each without at least one more
        member). Security: nothing of a stopped set-up is secret any more or ever
        shared (the nonces are revealed, no share was sent), and a fresh one gives the
        server no choice it lacks otherwise (it can always abort a round and run
        another); the graph of the new set-up hashes fresh nonces committed before the
        server knew any of them.

        Raises:
            SecAggAborted: too few clients, or still nonces withheld after
                ``max_setup_attempts`` set-ups.
        """
        for attempt in range(1, self.max_setup_attempts + 1):
            try:
                return self._one_setup(grid, report, context, server_round)
            except NonceWithheld as err:
                report.setup_attempts = attempt + 1
                for node in err.withheld:
                    report.excluded[str(node)] = "did not reveal the graph nonce it committed to"
                _add_dropouts(report, {Stage.ADVERTISE: len(context.cohort) - len(err.withheld)
                                       - len(err.revealed), Stage.ROSTER: len(err.withheld)})
                if attempt == self.max_setup_attempts or len(err.revealed) < 2:
                    raise SecAggAborted(
                        f"{err} ({attempt} set-ups tried, max_setup_attempts={self.max_setup_attempts})"
                    ) from None
                logger.warning(
                    "SecAgg+ round %d: nodes %s did not reveal their graph nonce; new set-up "
                    "(fresh keys and nonces) with the %d members that did",
                    server_round, err.withheld, len(err.revealed))
                context = self._context(grid, server_round, err.revealed, global_arrays, report,
                                        multi_round=context.multi_round)
        raise AssertionError("unreachable")  # pragma: no cover

    def _one_setup(self, grid: Grid, report: RoundReport, context: RoundContext, server_round: int) -> SecAggServer:
        """One advertise + roster exchange under ``context`` (see :meth:`_key_setup`)."""
        cohort = list(context.cohort)
        server = SecAggServer(context)
        self._items = _reply_items(len(cohort))
        replies = self._exchange(
            grid, report, Stage.ADVERTISE, {n: {Key.CONTEXT: context.to_dict()} for n in cohort}, server_round
        )
        ads = self._parse(replies, "advertisement", lambda p: Advertisement.from_dict(
            codec.field(p, Key.ADVERTISEMENT, dict)))
        # The roster of U1 (168 bytes per client) fixes who is in; then each client
        # reveals the graph nonce it committed to, and the graph follows from all.
        roster = server.receive_advertisements(ads)
        threshold = context.params.reconstruction_threshold
        if len(roster) - 1 < threshold:
            # Every member would refuse this roster (fewer than t peers): set up again
            # for U1 alone (k and t chosen for its size) instead of sending it.
            raise NonceWithheld(
                f"only {len(roster)} of {len(cohort)} clients advertised, too few for "
                f"reconstruction threshold {threshold}",
                [], [e.node_id for e in roster])
        packed = pack_roster(roster)
        replies = self._exchange(
            grid, report, Stage.ROSTER, {e.node_id: {Key.ROSTER: packed} for e in roster}, server_round
        )
        nonces = self._parse(replies, "nonce", lambda p: codec.field(p, Key.NONCE, bytes))
        server.receive_nonces(nonces)
        return server

    # -- multi-round sessions ----------------------------------------------------------
    def _session_usable(self, cohort: list[int], vector_length: int) -> str | None:
        """Why the current session cannot serve this round (``None``: it can)."""
        session = self._session
        if session is None:
            return "no session yet"
        outside = set(cohort) - set(session.cohort)
        if outside - self._setup_silent:
            # (Nodes that were sampled but silent at the set-up are not waited for: a
            # node lost for good would otherwise force a set-up every round. They
            # rejoin at the next one.)
            return f"{len(outside - self._setup_silent)} sampled nodes are not in the session"
        if session.rounds >= self.max_session_rounds:
            return f"the session ran its {self.max_session_rounds} rounds"
        if self._rekey is not None:
            return self._rekey
        if session.context.vector_length != vector_length:
            return "the model size changed"
        return None

    def _configure_session(
        self, server_round: int, messages: list[Message], cohort: list[int],
        global_arrays: dict[str, np.ndarray], grid: Grid, report: RoundReport,
    ) -> list[Message]:
        report.multi_round = True
        vector_length = num_values(global_arrays) + len(self.masked_metrics) + 1
        why = self._session_usable(cohort, vector_length)
        report.key_setup = why is not None
        try:
            if why is not None:
                logger.info("SecAgg+ round %d: setting keys up (%s)", server_round, why)
                self._session, self._rekey, self._lost = None, None, set()
                context = self._context(grid, server_round, cohort, global_arrays, report, multi_round=True)
                setup = self._key_setup(grid, report, context, server_round, global_arrays)
                lost = setup.stats.dropouts()
                _add_dropouts(report, {stage: lost[stage] for stage in (Stage.ADVERTISE, Stage.ROSTER)})
                self._session = SessionServer(setup)
                self._setup_silent = set(cohort) - set(self._session.cohort)
            session = self._session
            assert session is not None
            params = session.context.params
            report.num_shares = params.num_shares
            report.reconstruction_threshold = params.reconstruction_threshold
            report.modulus_bits = params.modulus_bits
            # Members that lost their session (UNKNOWN_SESSION) are not asked until the
            # next set-up: they would refuse before training; the others go on.
            asked = [n for n in cohort if n in session.graph and n not in self._lost]
            session.start_round(server_round, model_hash(global_arrays), asked)
        except SecAggAborted as err:
            self._abort(report, err)
            return []
        by_node = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for node in asked:
            content = RecordDict(dict(by_node[node].content.items()))
            payload: dict[str, Any] = {Key.SESSION: session.digest, Key.ROUND: server_round}
            if node not in session.opened:
                payload[Key.OPEN] = pack_open(session.open_payload(node))
            content[SECAGG_RECORD] = ConfigRecord(
                {Key.STAGE: Stage.MASKED_INPUT, Key.SERVER_ROUND: server_round, Key.PAYLOAD: codec.encode(payload)}
            )
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        report.bytes_to_clients[Stage.MASKED_INPUT] = sum(_payload_bytes(m) for m in out)
        self._round = {"session": session, "grid": grid, "arrays": global_arrays, "report": report,
                       "started": time.monotonic(), "messages": out}
        return out

    def _aggregate_session(
        self, server_round: int, state: dict[str, Any], replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        session: SessionServer = state["session"]
        report: RoundReport = state["report"]
        grid: Grid = state["grid"]
        report.stage_seconds[Stage.MASKED_INPUT] = round(time.monotonic() - state["started"], 4)
        base: dict[str, Any] = {Key.SESSION: session.digest, Key.ROUND: server_round}
        try:
            inputs, metrics = self._collect_session_inputs(session, report, replies, state["messages"])
            survivors = session.receive_masked_inputs(inputs)
            report.clipped_values = sum(inputs[n].clipped for n in survivors)
            # U3 travels as the session members not in it: O(dropouts) bytes, not O(n)
            base[Key.ABSENT] = sorted(set(session.cohort) - set(survivors))
            replies4 = self._exchange(
                grid, report, Stage.CONSISTENCY, {n: base for n in survivors}, server_round,
            )
            signatures = self._parse(replies4, "signature", _signature)
            requests = {}
            for node in session.receive_signatures(signatures):
                sigs, cts = session.unmask_request(node)
                requests[node] = {**base,
                                  Key.SIGNATURES: {str(k): v for k, v in sigs.items()},
                                  Key.CIPHERTEXTS: {str(k): v for k, v in cts.items()}}
            replies5 = self._exchange(grid, report, Stage.UNMASK, requests, server_round)
            reveals = self._parse(replies5, "unmask reply", _reveal)
            session.receive_unmask(reveals)
            if self.recover_culprits:
                self._recover(grid, report, session, base, server_round)
            started = time.monotonic()
            total, weight = session.aggregate()
            report.stage_seconds[UNMASK_COMPUTE] = round(time.monotonic() - started, 4)
            survivors = session.summed
            report.clipped_values = sum(inputs[n].clipped for n in survivors)
            if session.culprits:
                # Taken out of this round's sum and left out of the session's next ones.
                self._lost.update(session.culprits)
        except SecAggAborted as err:
            self._abort(report, err)
            # Too many losses for this session's graph: the next round sets keys up
            # again with whoever answers (the survivors), instead of excluding them
            # round after round under the same graph.
            if session.culprits:
                # Named culprits (their own commitments contradict their reveals) are
                # left out of the session's next rounds; the graph itself is fine.
                self._lost.update(session.culprits)
            else:
                self._rekey = f"round {server_round} aborted ({err})"
            return None, None
        finally:
            _add_dropouts(report, session.stats.dropouts())
            report.excluded.update({str(k): v for k, v in session.stats.excluded.items()})
        return self._release(server_round, state["arrays"], report, session.context, total, weight,
                             survivors, metrics)

    def _recover(self, grid: Grid, report: RoundReport, session: SessionServer, base: dict[str, Any],
                 server_round: int) -> None:
        """The ``unmask-recover`` stage, only in a round with a proven culprit: each
        honest neighbour of a culprit gets the culprits' signed statements, checks them
        and the survivor set without them itself, and reveals its round pair seed with
        each culprit next to it (:meth:`SessionClient.recover
        <flwr_guard.secagg.session_client.SessionClient.recover>`)."""
        requests = session.recovery_requests()
        if not requests:
            return
        logger.warning("SecAgg+ round %d: culprits %s proven (signed reveal contradicts signed "
                       "commitment); asking %d neighbours to take their inputs out",
                       server_round, sorted(session.evidence), len(requests))
        payloads = {
            node: {**base, Key.EVIDENCE: {str(c): e.to_wire() for c, e in evidence.items()}}
            for node, evidence in requests.items()
        }
        replies = self._exchange(grid, report, Stage.UNMASK_RECOVER, payloads, server_round)
        session.receive_recovery(self._parse(replies, "recovery reply", _recovered))

    def _collect_session_inputs(
        self, session: SessionServer, report: RoundReport, replies: list[Message], sent: list[Message]
    ) -> tuple[dict[int, RoundInput], dict[int, MetricRecord]]:
        destinations = _destinations(sent)
        inputs: dict[int, RoundInput] = {}
        metrics: dict[int, MetricRecord] = {}
        size = 0
        for reply in replies:
            node = _reply_node(reply, destinations)
            if reply.has_error():
                logger.warning("SecAgg+ masked-input: node %s failed: %s", node, reply.error.reason)
                if UNKNOWN_SESSION in str(reply.error.reason):
                    # That client lost its session: leave it out of the session's next
                    # rounds (not the cohort's re-key); it rejoins at the next set-up.
                    self._lost.add(node)
                    session.stats.excluded.setdefault(node, "no usable SecAgg+ session")
                continue
            try:
                (vector,) = reply.content.array_records[MASKED_ARRAYS].to_numpy_ndarrays()
                meta = self._decoded(reply)
                raw = codec.field(meta, Key.CIPHERTEXTS, dict)
                pairs = meta.get(Key.PAIR_COMMITMENTS, {})
                if not isinstance(pairs, dict):
                    raise ValueError("pair_commitments must map node ids to bytes")
                inputs[node] = RoundInput(
                    vector, codec.field(meta, Key.COMMITMENT, bytes),
                    {_node_id(k): v for k, v in raw.items()},
                    _clipped(meta, session.context.update_length),
                    {_node_id(k): v for k, v in pairs.items()},
                    _optional_bytes(meta, Key.INPUT_SIGNATURE),
                )
                size += _payload_bytes(reply)
            except Exception as err:
                logger.warning("SecAgg+: malformed masked input from %s, excluded: %s: %s",
                               node, type(err).__name__, err)
                continue
            metrics[node] = next(iter(reply.content.metric_records.values()), MetricRecord())
        report.bytes_from_clients[Stage.MASKED_INPUT] = size
        return inputs, metrics

    def _parse(self, replies: dict[int, Message], what: str, parse: Callable[[dict], _T]) -> dict[int, _T]:
        """``parse`` of each reply's decoded payload; a reply that does not parse is
        logged and left out (its sender counts as dropped at this stage)."""
        out: dict[int, _T] = {}
        for node, reply in replies.items():
            try:
                out[node] = parse(self._decoded(reply))
            except Exception as err:
                logger.warning("SecAgg+: malformed %s from %s, excluded: %s: %s",
                               what, node, type(err).__name__, err)
        return out

    def _decoded(self, reply: Message) -> dict:
        """The reply's control payload; checked to be bytes of bounded size, nesting
        and item count before decoding (:func:`flwr_guard.secagg.codec.decode`), so a
        client's message never makes the server allocate much more than it.

        Raises:
            ValueError: no such record or payload, not bytes, too large, too deep or
                too many items (:class:`~flwr_guard.secagg.codec.MalformedMessage`).
        """
        blob = reply.content.config_records[SECAGG_RECORD].get(Key.PAYLOAD)
        if not isinstance(blob, bytes) or len(blob) > MAX_REPLY_BYTES:
            raise ValueError("SecAgg+ reply payload missing, not bytes, or too large")
        return codec.decode(blob, max_items=self._items)

    # -- train ---------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample with the wrapped strategy, then set keys up (every round, or once per
        session) and return the train messages with their SecAgg+ instructions."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._round = None
        report = RoundReport(server_round)
        self.history.append(report)
        if not messages:
            return []
        cohort = sorted({m.metadata.dst_node_id for m in messages})
        global_arrays = {k: v.numpy() for k, v in arrays.items()}
        report.cohort = len(cohort)
        if self.multi_round:
            return self._configure_session(server_round, messages, cohort, global_arrays, grid, report)
        try:
            context = self._context(grid, server_round, cohort, global_arrays, report, multi_round=False)
            server = self._key_setup(grid, report, context, server_round, global_arrays)
            packed_nonces = pack_nonces(server.nonces)
            # O(k) part per client (its neighbours' advertisements) + U1's nonces.
            replies = self._exchange(
                grid, report, Stage.SHARE_KEYS,
                {
                    n: {Key.NONCES: packed_nonces,
                        Key.ADVERTISEMENTS: pack_advertisements(server.neighbour_advertisements(n))}
                    for n in server.stats.advertised
                },
                server_round,
            )
            shares = self._parse(replies, "shares", lambda p: {
                _node_id(k): v for k, v in codec.field(p, Key.CIPHERTEXTS, dict).items()})
            routed = server.receive_shares(shares)
        except SecAggAborted as err:
            self._abort(report, err)
            return []
        shared = sorted(routed)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for node in shared:
            # Strategies may share one RecordDict between all messages: copy it.
            content = RecordDict(dict(by_node[node].content.items()))
            content[SECAGG_RECORD] = ConfigRecord(
                {
                    Key.STAGE: Stage.MASKED_INPUT,
                    Key.SERVER_ROUND: server_round,
                    Key.PAYLOAD: codec.encode(
                        {Key.SHARED: shared, Key.CIPHERTEXTS: {str(s): c for s, c in routed[node].items()}}
                    ),
                }
            )
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        report.bytes_to_clients[Stage.MASKED_INPUT] = sum(_payload_bytes(m) for m in out)
        self._round = {"server": server, "grid": grid, "arrays": global_arrays, "report": report,
                       "started": time.monotonic(), "messages": out}
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the survivors and hand its average to the wrapped strategy."""
        state, self._round = self._round, None
        replies = list(replies)
        if state is None:
            return None, None
        if "session" in state:
            return self._aggregate_session(server_round, state, replies)
        server: SecAggServer = state["server"]
        report: RoundReport = state["report"]
        grid: Grid = state["grid"]
        report.stage_seconds[Stage.MASKED_INPUT] = round(time.monotonic() - state["started"], 4)
        try:
            masked, metrics, clipped = self._collect_masked(server, report, replies, state["messages"])
            survivors = server.receive_masked_inputs(masked)
            report.clipped_values = sum(clipped.get(n, 0) for n in survivors)
            replies4 = self._exchange(
                grid, report, Stage.CONSISTENCY, {n: {Key.SURVIVORS: survivors} for n in survivors}, server_round
            )
            signatures = self._parse(replies4, "signature", _signature)
            active, dropped, sigs = server.receive_signatures(signatures)
            # Each client gets the signatures it checks (its neighbours'): O(k), not O(n).
            requests = {
                n: {Key.ACTIVE: active, Key.DROPPED: dropped,
                    Key.SIGNATURES: {str(k): v for k, v in server.unmask_signatures(n).items()}}
                for n in sigs
            }
            replies5 = self._exchange(grid, report, Stage.UNMASK, requests, server_round)
            reveals = self._parse(replies5, "unmask reply", lambda p: {
                _node_id(k): _share(v) for k, v in codec.field(p, Key.SHARES, dict).items()})
            server.receive_unmask(reveals)
            started = time.monotonic()
            total, weight = server.aggregate()
            report.stage_seconds[UNMASK_COMPUTE] = round(time.monotonic() - started, 4)
        except SecAggAborted as err:
            self._abort(report, err)
            return None, None
        finally:
            _add_dropouts(report, server.stats.dropouts())
            report.excluded.update({str(k): v for k, v in server.stats.excluded.items()})
        return self._release(server_round, state["arrays"], report, server.context, total, weight,
                             active, metrics)

    def _release(
        self, server_round: int, global_arrays: dict[str, np.ndarray], report: RoundReport,
        context: RoundContext, total: np.ndarray, weight: int, active: list[int],
        metrics: dict[int, MetricRecord],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the wrapped strategy one reply: the survivors' weighted average model."""
        params, d = context.params, context.update_length
        # Lift the update's sum around its middle: distributed-DP noise may take it
        # below 0 or above W L (the identity on [0, W L] otherwise).
        lifted, wraparounds = centered_lift(
            total[:d], weight * params.quantization_range // 2, params.modulus_bits
        )
        report.wraparounds = wraparounds
        if wraparounds:
            logger.warning("SecAgg+ round %d: %d coordinates wrapped around the modulus",
                           server_round, wraparounds)
        mean_update = dequantize_mean(lifted, weight, params.clipping_range, params.quantization_range)
        aggregate = apply_flat_update(global_arrays, mean_update)
        report.survivors = len(active)
        plain = self._plain_metrics([metrics[n] for n in active if n in metrics])
        plain.update({k: float(v) for k, v in zip(self.masked_metrics, total[d:], strict=True)})
        plain[WEIGHT_KEY] = weight
        plain[WRAPAROUNDS_KEY] = wraparounds
        record = ArrayRecord(array_dict={k: Array(v) for k, v in aggregate.items()})
        synthetic = Message(
            content=RecordDict({"arrays": record, "metrics": MetricRecord(plain)}),
            message_type=MessageType.TRAIN,
            dst_node_id=0,
        )
        return self.strategy.aggregate_train(server_round, [synthetic])

    def _collect_masked(
        self, server: SecAggServer, report: RoundReport, replies: list[Message], sent: list[Message]
    ) -> tuple[dict[int, tuple[np.ndarray, list[int]]], dict[int, MetricRecord], dict[int, int]]:
        masked: dict[int, tuple[np.ndarray, list[int]]] = {}
        metrics: dict[int, MetricRecord] = {}
        clipped: dict[int, int] = {}
        destinations = _destinations(sent)
        size = 0
        for reply in replies:
            node = _reply_node(reply, destinations)
            if reply.has_error():
                logger.warning("SecAgg+ masked-input: node %s failed: %s", node, reply.error.reason)
                continue
            try:
                record = reply.content.array_records[MASKED_ARRAYS]
                (vector,) = record.to_numpy_ndarrays()
                meta = self._decoded(reply)
                bad = codec.field(meta, Key.BAD_SENDERS, list)
                if len(bad) > len(server.context.cohort) or not all(
                    isinstance(b, int) and not isinstance(b, bool) for b in bad
                ):
                    raise ValueError("bad_senders must be a short list of node ids")
                clipped[node] = _clipped(meta, server.context.update_length)
                size += _payload_bytes(reply)
            except Exception as err:
                logger.warning("SecAgg+: malformed masked input from %s, excluded: %s: %s",
                               node, type(err).__name__, err)
                continue
            # A vector of another dtype or length is excluded by the server core.
            masked[node] = (vector, bad)
            metrics[node] = next(iter(reply.content.metric_records.values()), MetricRecord())
        report.bytes_from_clients[Stage.MASKED_INPUT] = size
        return masked, metrics, clipped

    @staticmethod
    def _plain_metrics(records: list[MetricRecord]) -> dict[str, int | float | list[int] | list[float]]:
        """Unweighted mean of the metrics that every survivor sent in the clear."""
        if not records:
            return {}
        keys = set(records[0]).intersection(*map(set, records[1:]))
        out: dict[str, int | float | list[int] | list[float]] = {}
        for key in sorted(keys):
            values = [r[key] for r in records]
            if all(isinstance(v, (int, float)) for v in values):
                out[key] = float(np.mean(values))
        return out

    def _abort(self, report: RoundReport, err: Exception) -> None:
        report.aborted = str(err)
        logger.error("%s; the global model is unchanged this round", err)

