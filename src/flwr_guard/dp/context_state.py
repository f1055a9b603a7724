"""Flower adapter: the Opacus accountant of DP-SGD kept in ``context.state``.

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
        columns = [list(record[k]) for k in ("noise-multiplier", "sample-rate", "steps")]  # type: ignore[arg-type]
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


def dpsgd_from_context(context: Context, config: DPSGDConfig | None = None, **kwargs: Any) -> DPSGD:
    """A :class:`DPSGD` configured from the run config, its ledger from ``context.state``.

    Args:
        context: the ClientApp's context.
        config: overrides :meth:`DPSGDConfig.from_run_config` (``dp-sgd-*`` keys).
        kwargs: passed to :class:`DPSGD` (e.g. ``noise_generator``).
    """
    config = config or DPSGDConfig.from_run_config(context.run_config)
    return DPSGD(config, load_accountant_state(context), **kwargs)


def save_dpsgd(context: Context, dpsgd: DPSGD) -> None:
    """Write ``dpsgd``'s ledger back to ``context.state`` (call after training)."""
    save_accountant_state(context, dpsgd.accountant_state())
