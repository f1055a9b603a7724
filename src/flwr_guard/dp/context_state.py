"""Flower adapter: DP-SGD's ledger on the node's disk, mirrored in ``context.state``.

The durable ledger is the :class:`~flwr_guard.dp.record_ledger.RecordLedger` of the
node's data source (node config ``dp-sgd-data-source``, default
``partition-<partition-id>`` or ``default``) in the directory of node config
``dp-sgd-ledger`` (default :func:`~flwr_guard.dp.record_ledger.default_ledger_dir`),
created beforehand by ``flwr-guard ledger init``; a missing or corrupt ledger refuses
DP-SGD. The node's own policy in node config (``dp-sgd-max-epsilon``,
``dp-sgd-min-noise-multiplier``, ``dp-sgd-secure-mode``; library defaults otherwise)
bounds what the run config and the app ask for: :meth:`DPSGDConfig.bounded_by`.

``context.state`` is the per-node ``RecordDict`` that Flower keeps across the messages
of a run (also when every message runs in a new ClientApp process). The accountant's
``state_dict()`` — ``{"history": [(noise_multiplier, sample_rate, steps), ...],
"mechanism": "rdp"}`` — is stored there as a ``ConfigRecord`` of three parallel lists,
so the next round's :class:`~flwr_guard.dp.dpsgd.DPSGD` continues the same ledger.
"""

from __future__ import annotations

import sys
from typing import Any

from flwr.app import ConfigRecord, Context

from flwr_guard.config_values import sequence
from flwr_guard.dp.dpsgd import DPSGD, DPSGDConfig
from flwr_guard.dp.node_policy import data_source
from flwr_guard.dp.record_ledger import RecordLedger, default_ledger_dir, init_command
from flwr_guard.keys import NodeConfig

STATE_KEY = "flwr-guard-dp-sgd-accountant"


def load_accountant_state(context: Context) -> dict[str, Any] | None:
    """The saved accountant ``state_dict`` of this node, or ``None`` if there is none.

    Raises:
        ValueError: if the stored record is malformed.
    """
    if STATE_KEY not in context.state.config_records:
        return None
    record = context.state.config_records[STATE_KEY]
    try:
        columns = [sequence(record[k], k) for k in ("noise-multiplier", "sample-rate", "steps")]
        mechanism = str(record["mechanism"])
    except KeyError as err:
        raise ValueError(f"context.state[{STATE_KEY!r}] misses {err.args[0]!r}") from None
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"context.state[{STATE_KEY!r}] holds lists of different lengths")
    history = [(float(z), float(q), int(n)) for z, q, n in zip(*columns, strict=True)]
    return {"history": history, "mechanism": mechanism}


def save_accountant_state(context: Context, state: dict[str, Any]) -> None:
    """Store an accountant ``state_dict`` in ``context.state`` (replacing the old one)."""
    history = list(state["history"])
    context.state.config_records[STATE_KEY] = ConfigRecord(
        {
            "noise-multiplier": [float(z) for z, _, _ in history],
            "sample-rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
            "mechanism": str(state["mechanism"]),
        }
    )


def in_simulation() -> bool:
    """Whether this ClientApp runs inside Flower's simulation runtime (a Ray actor)."""
    return "flwr.simulation.ray_transport.ray_actor" in sys.modules


def node_ledger(context: Context, expected: list | None = None) -> RecordLedger:
    """The node's :class:`RecordLedger` (node config ``dp-sgd-ledger``,
    ``dp-sgd-data-source``), checked against ``expected`` (the node's memory).

    Raises:
        LedgerMissing / LedgerCorrupt: naming ``flwr-guard ledger init``.
        ValueError: the removed node config ``dp-sgd-ledger-reset``, or a bad source id.
    """
    node = context.node_config
    directory = str(node.get(NodeConfig.DP_SGD_LEDGER, "") or "") or str(default_ledger_dir())
    source = data_source(node)
    if NodeConfig.DP_SGD_LEDGER_RESET in node:
        raise ValueError(
            f"node config {NodeConfig.DP_SGD_LEDGER_RESET} is no longer read: a ledger is started again "
            f"only by `{init_command(directory, source)} --force` (forgets the epsilon spent)")
    return RecordLedger(directory, source, node_id=context.node_id, expected_history=expected,
                        create_missing=in_simulation())


def dpsgd_from_context(context: Context, config: DPSGDConfig | None = None,
                       epochs: int | None = None, **kwargs: Any) -> DPSGD:
    """A :class:`DPSGD` configured from the run and node config, with the node's ledger.

    Args:
        context: the ClientApp's context.
        config: the app's own config (else :meth:`DPSGDConfig.from_run_config`, the
            ``dp-sgd-*`` keys of the run config); either way bounded by the node's policy
            (:meth:`DPSGDConfig.bounded_by`: budget cap, noise floor, secure mode).
        epochs: local epochs of this round (required: the budget is always finite).
        kwargs: passed to :class:`DPSGD` (e.g. ``noise_generator``).

    Raises:
        ValueError: a run config or app config below the node's floors, or a malformed
            state record.
        LedgerMissing / LedgerCorrupt: the node's ledger is missing or unreadable (the
            message names ``flwr-guard ledger init``); nothing is written.
    """
    node = context.node_config
    if config is None:
        config = DPSGDConfig.from_run_config(context.run_config, node_config=node)
    else:
        config = config.bounded_by(node)
    memory = load_accountant_state(context)
    ledger = node_ledger(context, (memory or {}).get("history", []))
    return DPSGD(config, memory, ledger=ledger, epochs=epochs, **kwargs)


def save_dpsgd(context: Context, dpsgd: DPSGD) -> float:
    """After training: finish the round (:meth:`DPSGD.finish`), mirror the ledger in
    ``context.state``; return the record-level epsilon spent."""
    epsilon = dpsgd.finish()
    save_accountant_state(context, dpsgd.accountant_state())
    return epsilon
