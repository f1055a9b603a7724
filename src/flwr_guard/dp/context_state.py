"""Flower adapter: DP-SGD's ledger on the node's disk, mirrored in ``context.state``.

The durable ledger is a :class:`~flwr_guard.dp.record_ledger.RecordLedger` in the
directory of node config ``dp-sgd-ledger`` (default
:func:`~flwr_guard.dp.record_ledger.default_ledger_dir`); node config
``dp-sgd-ledger-required`` / ``dp-sgd-ledger-reset`` (bool) say whether a missing ledger
is an error and whether to start a new one. The node's own policy in node config
(``dp-sgd-max-epsilon``, ``dp-sgd-min-noise-multiplier``, ``dp-sgd-secure-mode``) bounds
what the run config (the server's) asks for: see :meth:`DPSGDConfig.from_run_config`.

``context.state`` is the per-node ``RecordDict`` that Flower keeps across the messages
of a run (also when every message runs in a new ClientApp process). The accountant's
``state_dict()`` — ``{"history": [(noise_multiplier, sample_rate, steps), ...],
"mechanism": "rdp"}`` — is stored there as a ``ConfigRecord`` of three parallel lists,
so the next round's :class:`~flwr_guard.dp.dpsgd.DPSGD` continues the same ledger.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context

from flwr_guard.dp.dpsgd import DPSGD, DPSGDConfig
from flwr_guard.dp.record_ledger import RecordLedger, default_ledger_dir

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
        columns = [list(record[k]) for k in ("noise-multiplier", "sample-rate", "steps")]
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


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def dpsgd_from_context(context: Context, config: DPSGDConfig | None = None,
                       epochs: int | None = None, **kwargs: Any) -> DPSGD:
    """A :class:`DPSGD` configured from the run and node config, with the node's ledger.

    Args:
        context: the ClientApp's context.
        config: overrides :meth:`DPSGDConfig.from_run_config` (``dp-sgd-*`` keys of the
            run config, bounded by the node config).
        epochs: local epochs of this round (required when a budget is set).
        kwargs: passed to :class:`DPSGD` (e.g. ``noise_generator``, ``fingerprint``).

    Raises:
        ValueError: a run config below the node's floors, or a malformed state record.
        LedgerMissing: (from ``make_private``) the ledger is expected but missing.
    """
    node = context.node_config
    config = config or DPSGDConfig.from_run_config(context.run_config, node_config=node)
    directory = str(node.get("dp-sgd-ledger", "") or "") or str(default_ledger_dir())
    required = _flag(node.get("dp-sgd-ledger-required", False))
    reset = _flag(node.get("dp-sgd-ledger-reset", False))
    memory = load_accountant_state(context)

    def ledger(fingerprint: str, expected: list) -> RecordLedger:
        return RecordLedger(directory, fingerprint, node_id=context.node_id,
                            expected_history=expected, required=required, reset=reset)

    return DPSGD(config, memory, ledger=ledger, epochs=epochs, **kwargs)


def save_dpsgd(context: Context, dpsgd: DPSGD) -> float:
    """After training: finish the round (:meth:`DPSGD.finish`), mirror the ledger in
    ``context.state``; return the record-level epsilon spent."""
    epsilon = dpsgd.finish()
    save_accountant_state(context, dpsgd.accountant_state())
    return epsilon
