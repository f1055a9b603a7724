"""What a guarded SuperNode enforced, one line per round in its log (and its exporter).

:func:`round_log_mod` runs outermost in the guard process (outside the policy mods) and
only observes: it never changes a message or a reply, and an error of its own is logged,
not raised. For each round (Flower's ``group_id``) it writes one line::

    flwr-guard node round 2 (run 7): policy 3f2a...; sent masked; SecAgg+ survivors 3;
    noise distributed z=1.1 C=1; epsilon record-level 0.82 of 8; audit not run (needs the app)

- **policy**: :meth:`~flwr_guard.node.policy.NodePolicy.digest` of the node's policy;
- **verdict**: ``sent masked`` (SecAgg+ masked input), ``sent in the clear`` (only
  when the operator set ``guard-require-secagg=false``) or ``refused: <reason>``;
- **SecAgg+ survivors**: the ``active`` set of the round's unmask stage (the line is
  written then; a round that this node leaves early is written when it leaves). In a
  session round with a proven culprit, the ``unmask-recover`` stage that follows writes
  a second line for the round, ``recovery: N proven culprit(s) left out of the sum``
  with the survivors less the culprits (or ``refused: <reason>`` when this node refused
  to reveal); it updates the exporter's survivors but does not count the round twice;
- **noise**: what the node let into the update: distributed Skellam noise at the
  multiplier the round's config asked for and the node's floors accepted, central
  noise (added by the server), or none;
- **epsilon**: the record-level epsilon the app reported (DP-SGD needs the app), else
  ``n/a``;
- **audit**: the leakage audit's verdict when the app ran one, else ``not run``.

The same values go to the node exporter (:func:`flwr_guard.telemetry.node.record_guard_round`)
when ``PROMETHEUS_MULTIPROC_DIR`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from flwr_guard.config_values import raw_bytes
from flwr_guard.keys import TrainConfig
from flwr_guard.secagg.constants import SECAGG_RECORD, Stage
from flwr_guard.secagg.constants import STATE_RECORD as SECAGG_STATE_RECORD
from flwr_guard.telemetry import keys

logger = logging.getLogger("flwr_guard.node")

STATE_RECORD = "flwr-guard.node-round"
LINE_PREFIX = "flwr-guard node round"


def _stage(msg: Message) -> str | None:
    record = msg.content.config_records.get(SECAGG_RECORD) if msg.has_content() else None
    stage = record.get("stage") if record is not None else None
    return stage if isinstance(stage, str) else None


def _config(msg: Message) -> ConfigRecord:
    for name, record in msg.content.config_records.items():
        if name != SECAGG_RECORD:
            return record
    return ConfigRecord()


def _round(msg: Message) -> str:
    """The server round: Flower's ``group_id``, else the train config's ``server-round``
    (Flower's Message API strategies send it), else ``-``."""
    if msg.metadata.group_id:
        return msg.metadata.group_id
    value = _config(msg).get("server-round") if msg.has_content() else None
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def _noise(config: ConfigRecord) -> str:
    z, c = config.get(TrainConfig.DP_NOISE_MULTIPLIER), config.get(TrainConfig.DP_CLIPPING_NORM)
    c = c if isinstance(c, (int, float)) else None
    if not isinstance(z, (int, float)):
        return "none" if c is None else f"none (clipped to C={c:g})"
    mode = "distributed" if config.get(TrainConfig.DP_DISTRIBUTED) is True else "central (added by the server)"
    return f"{mode} z={z:g}" + ("" if c is None else f" C={c:g}")


def _survivors(msg: Message, context: Context) -> int | None:
    """The round's survivors from its unmask stage: the ``active`` set (one-round
    SecAgg+), or the session's cohort minus the ``absent`` set (multi-round sessions:
    the cohort from the node's own session state)."""
    from flwr_guard.secagg import codec

    try:
        payload = codec.decode(raw_bytes(msg.content.config_records[SECAGG_RECORD]["payload"], "payload"))
        if isinstance(payload.get("active"), list):
            return len(payload["active"])
        state = context.state.config_records[SECAGG_STATE_RECORD]
        cohort = codec.decode(raw_bytes(state["session"], "session"))["context"]["cohort"]
        return len(set(cohort) - set(payload.get("absent", [])))
    except Exception:  # the SecAgg+ mod itself judges the payload
        return None


def _culprits(msg: Message) -> int:
    """How many culprits an ``unmask-recover`` message names (its evidence's keys)."""
    from flwr_guard.secagg import codec
    from flwr_guard.secagg.constants import Key

    try:
        payload = codec.decode(raw_bytes(msg.content.config_records[SECAGG_RECORD]["payload"], "payload"))
        evidence = payload.get(Key.EVIDENCE)
        return len(evidence) if isinstance(evidence, dict) else 0
    except Exception:  # the SecAgg+ mod itself judges the payload
        return 0


def _forget(context: Context) -> None:
    if STATE_RECORD in context.state:
        del context.state[STATE_RECORD]


def format_line(round_: str, run_id: int, values: dict[str, Any]) -> str:
    """The round's line (see the module docstring) from the recorded ``values``."""
    survivors = values.get("survivors")
    eps, budget = values.get("epsilon"), values.get("budget")
    epsilon = "n/a (record-level DP-SGD needs the app)" if eps is None else (
        f"record-level {eps:.3g}" + (f" of {budget:g}" if budget else ""))
    return (f"{LINE_PREFIX} {round_} (run {run_id}): policy {values.get('policy', '?')}; "
            f"{values.get('verdict', '?')}; SecAgg+ survivors "
            f"{'-' if survivors is None else survivors}; noise {values.get('noise', 'none')}; "
            f"epsilon {epsilon}; audit {values.get('audit', 'not run')}")


def round_log_mod(policy_digest: str, emit: Callable[[str], None] | None = None) -> Any:
    """Build the observing mod (see the module docstring).

    Args:
        policy_digest: the node policy's digest (:meth:`NodePolicy.digest`).
        emit: where a line goes (default: this module's logger at INFO and the node
            exporter).
    """
    def _emit(line: str, values: dict[str, Any], run_id: int, count_round: bool = True) -> None:
        (emit or (lambda text: logger.info("%s", text)))(line)
        try:
            from flwr_guard.telemetry.node import record_guard_round

            record_guard_round(str(run_id), values, count_round=count_round)
        except Exception:
            logger.exception("node exporter: could not record the round")

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        try:
            _observe(msg, context, reply)
        except Exception:
            logger.exception("flwr-guard node: could not log the round")
        return reply

    def _observe(msg: Message, context: Context, reply: Message) -> None:
        if msg.metadata.message_type.split(".", 1)[0] != "train":
            return  # one line per round: the train side (a refused evaluate logs its refusal)
        stage = _stage(msg)
        run_id = msg.metadata.run_id
        record = context.state.config_records.get(STATE_RECORD)
        # A round's masked input opens its record; the later stages (consistency,
        # unmask) may carry no round number of their own.
        values: dict[str, Any] = {} if stage in (None, Stage.MASKED_INPUT) or record is None else dict(record)
        round_ = _round(msg)
        round_ = str(values.get("round", "-")) if round_ == "-" else round_
        values.update(policy=policy_digest, round=round_)
        recovery = stage == Stage.UNMASK_RECOVER
        if reply.has_error():
            values["verdict"] = f"refused: {reply.error.reason}"
            values["refused"] = 1
            _emit(format_line(round_, run_id, values), values, run_id, count_round=not recovery)
            _forget(context)
            return
        if recovery:
            culprits = _culprits(msg)
            survivors = values.get("survivors")
            values["survivors"] = survivors - culprits if isinstance(survivors, int) else None
            values["verdict"] = f"recovery: {culprits} proven culprit(s) left out of the sum"
            _emit(format_line(round_, run_id, values), values, run_id, count_round=False)
            _forget(context)
            return
        if stage in (None, Stage.MASKED_INPUT):
            config = _config(msg)
            values["noise"] = _noise(config)
            values["verdict"] = "sent masked" if stage else "sent in the clear"
            for metrics in reply.content.metric_records.values():
                eps = keys.lookup(metrics, keys.RECORD_EPSILON)
                if eps is not None:
                    values["epsilon"] = eps
                leak = keys.lookup(metrics, keys.LEAK)
                if leak is not None and (keys.lookup(metrics, keys.AUDITED) or 0) > 0:
                    values["audit"] = "leaks" if leak > 0 else "no leak"
            if stage is None:
                _emit(format_line(round_, run_id, values), values, run_id)
                return
        if stage == Stage.UNMASK:
            values["survivors"] = _survivors(msg, context)
            _emit(format_line(round_, run_id, values), values, run_id)
            # Only what a recovery stage of this round needs is kept; the next round's
            # masked input starts a new record.
            context.state[STATE_RECORD] = ConfigRecord(
                {k: values[k] for k in ("round", "survivors") if isinstance(values.get(k), (int, str))})
            return
        context.state[STATE_RECORD] = ConfigRecord(
            {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})

    return mod
