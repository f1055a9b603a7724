"""Trap-model check: would an aggregate of this client's update reveal its records?

A malicious server can send weights crafted so that a linear layer's gradient reveals
individual inputs even through secure aggregation: imprint / binning modules (Fowl et
al., "Robbing the Fed", ICLR 2022), trap weights (Boenisch et al., "When the Curious
Abandon Honesty", EuroS&P 2023). SecAgg+ binds every client to one model, so the check
runs on the model the client received, before any training:

1. **malformed weights**: NaN or infinite values are refused (the adapter also refuses
   a state dict that does not fit the app's architecture);
2. **structure**: a linear layer that sees the input and has ``>= min_group_rows`` rows
   of one direction (cosine >= 0.999; :func:`flwr_guard.audit.analytic.imprint_groups`)
   is the signature of a binning layer — random or trained weights never line up so;
3. **behaviour**: the client builds the update an aggregate would hold — its own
   batch of ``batch_size`` records plus ``aggregate_size − 1`` stand-in batches drawn
   from its other records, one gradient each (FedSGD), averaged as FedAvg does — runs
   the closed-form attacks on it (:mod:`flwr_guard.audit.analytic`) and counts the
   records that come out within ``tolerance`` relative L2 error. More than
   ``max_revealed_fraction`` of them is a trap.

Why a fraction and not zero: honest ReLU layers leak a few records too. A neuron that
only one record of the aggregate activates gives that record exactly (Phong's row);
with random or trained weights this happens for 1–5 of 128 records on the digits MLP
and the wine MLP (benchmarks/audit_trap.py). That is a real, known leak of a first
fully connected layer (DP is its remedy, and the leakage audit reports it); the check
is for models *crafted* to leak many records, which reveal 10–15 % (imprint) or more.

Assumptions and limits (docs/audit.md): the check sees only linear layers whose input
is an element-wise affine function of the model's input (flatten, normalisation);
imprints behind a convolution, attention or other mixing, attacks spread over several
rounds (each round's model is checked alone) and optimisation attacks on honest models
(the leakage audit's job) are not caught. The simulated aggregate uses one gradient
step; several local steps blur the bins slightly but do not remove them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from flwr_guard.audit.analytic import SAME_DIRECTION as SAME_DIRECTION_COSINE
from flwr_guard.audit.analytic import imprint_groups, input_layers, recover
from flwr_guard.audit.inputs import AuditData
from flwr_guard.audit.update import LocalTraining, gradient_equivalent_update, trainable_params


@dataclass(frozen=True)
class TrapCheckConfig:
    """Settings of the trap-model check.

    Attributes:
        aggregate_size: clients in the simulated aggregate (>= 1; the SecAgg+ cohort).
        batch_size: records per client update (>= 1).
        tolerance: relative L2 error under which a record counts as revealed (> 0).
        max_revealed_fraction: share of the probed records that may be revealed
            before the model is refused (in ``[0, 1)``).
        min_group_rows: rows of one direction that make a binning structure (>= 2).
        structural: run the structural test (2); the behavioural test (3) always runs.

    Raises:
        ValueError: for values outside the ranges above.
    """

    aggregate_size: int = 4
    batch_size: int = 32
    tolerance: float = 0.01
    max_revealed_fraction: float = 0.08
    min_group_rows: int = 3
    structural: bool = True

    def __post_init__(self) -> None:
        if self.aggregate_size < 1 or self.batch_size < 1 or self.min_group_rows < 2:
            raise ValueError("need aggregate_size >= 1, batch_size >= 1, min_group_rows >= 2")
        if not self.tolerance > 0 or not 0.0 <= self.max_revealed_fraction < 1.0:
            raise ValueError("need tolerance > 0 and max_revealed_fraction in [0, 1)")


@dataclass
class TrapFinding:
    """The check's outcome.

    Attributes:
        trapped: the model is refused.
        reason: one sentence (what was found, in which layer, with the numbers).
        revealed: records of the simulated aggregate recovered within the tolerance.
        probed: records in the simulated aggregate.
        imprint_rows: rows in same-direction groups of input layers.
        layers: names of the linear layers that see the input.
        seconds: wall time.
    """

    trapped: bool
    reason: str
    revealed: int = 0
    probed: int = 0
    imprint_rows: int = 0
    layers: tuple[str, ...] = ()
    seconds: float = 0.0


def nonfinite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point entries of ``state`` that hold NaN or infinite values."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_model(model: nn.Module, data: AuditData, config: TrapCheckConfig | None = None,
                seed: int = 0) -> TrapFinding:
    """Run the check on ``model`` (the received weights) with the client's ``data``.

    Args:
        model: the received model (not modified).
        data: the client's records (:func:`flwr_guard.audit.inputs.prepare`); token
            inputs are not checked (no linear layer sees token ids).
        config: aggregate, batch, tolerance, thresholds.
        seed: seeds the choice of records.

    Returns:
        A :class:`TrapFinding`.
    """
    config = config or TrapCheckConfig()
    started = time.monotonic()
    state = {k: v for k, v in model.state_dict().items()}
    bad = nonfinite_weights(state)
    if bad:
        return TrapFinding(True, f"malformed model: NaN or infinite weights in {bad[:5]}",
                           seconds=time.monotonic() - started)
    if data.modality == "tokens":
        return TrapFinding(False, "token inputs: no linear layer sees the input",
                           seconds=time.monotonic() - started)
    if data.low is not None:
        model = data.wrap_model(copy.deepcopy(model))
    params = trainable_params(model)
    shape = tuple(data.inputs.shape[1:])
    layers = input_layers(model, params, shape)
    names = tuple(layer.weight.rsplit(".", 1)[0] for layer in layers)
    if not layers:
        return TrapFinding(False, "no linear layer sees the input", seconds=time.monotonic() - started)
    grouped = 0
    for layer in layers:
        groups = [g for g in imprint_groups(params[layer.weight]) if len(g) >= config.min_group_rows]
        grouped += sum(len(g) for g in groups)
    generator = torch.Generator().manual_seed(seed)
    count = min(config.aggregate_size * config.batch_size, data.inputs.shape[0])
    chosen = torch.randperm(data.inputs.shape[0], generator=generator)[:count]
    batches = chosen.split(config.batch_size)
    total: list[torch.Tensor] | None = None
    for batch in batches:
        grad = gradient_equivalent_update(model, params, data.inputs[batch], data.labels[batch],
                                          LocalTraining(1, 1.0))
        total = grad if total is None else [a + g for a, g in zip(total, grad)]
    assert total is not None
    mean = [t / len(batches) for t in total]
    found = recover(model, params, mean, shape, layers)
    revealed = 0
    if found.shape[0]:
        records = data.original_units(data.inputs[chosen]).flatten(1).double()
        estimates = data.original_units(found).flatten(1).double()
        # relative L2 error of every (record, candidate) pair: ‖x̂ − x‖ / ‖x‖
        errors = torch.cdist(records, estimates) / records.norm(dim=1, keepdim=True).clamp_min(1e-12)
        revealed = int((errors.min(dim=1).values <= config.tolerance).sum())
    seconds = time.monotonic() - started
    structural = config.structural and grouped >= config.min_group_rows
    too_many = revealed > config.max_revealed_fraction * count
    if too_many or structural:
        parts = []
        if too_many:
            parts.append(
                f"an aggregate of {len(batches)} updates x {config.batch_size} records would "
                f"reveal {revealed} of {count} records exactly (closed-form recovery from "
                f"linear layer(s) {list(names)}, relative error <= {config.tolerance:g}; "
                f"at most {config.max_revealed_fraction:.0%} allowed)")
        if structural:
            parts.append(f"{grouped} rows of linear layer(s) {list(names)} share one direction "
                         "(an imprint/binning layer)")
        return TrapFinding(True, "trap model: " + "; ".join(parts), revealed, count, grouped,
                           names, seconds)
    return TrapFinding(False, f"{revealed} of {count} records revealed through {list(names)} "
                       f"(at most {config.max_revealed_fraction:.0%} allowed)",
                       revealed, count, grouped, names, seconds)


def structural_findings(arrays: dict[str, object], min_group_rows: int = 3) -> list[str]:
    """What a node can check on the received arrays alone, without the app's model or
    data (NumPy only): NaN/infinite values, and 2-D float arrays with at least
    ``min_group_rows`` rows of one direction (the binning signature, cosine >= 0.999).

    Meant for a node-side guard that runs around any app (a FAB that leaves the app's
    trap check out); it cannot tell which layer sees the input, so it looks at every
    matrix, and it cannot see trap weights (random rows). Honest weights have no two
    rows of one direction.

    Args:
        arrays: ``{name: array}`` as NumPy arrays (e.g. ``ArrayRecord.to_numpy_ndarrays``
            zipped with its keys).
        min_group_rows: rows of one direction that make a finding (>= 2).

    Returns:
        One sentence per finding (empty: nothing found).
    """
    import numpy as np

    out = []
    for name, value in arrays.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        if not np.isfinite(array).all():
            out.append(f"NaN or infinite values in {name!r}")
            continue
        if array.ndim != 2 or array.shape[0] < min_group_rows:
            continue
        rows = array.astype(np.float64)
        norms = np.linalg.norm(rows, axis=1)
        live = norms > 0
        unit = rows[live] / norms[live, None]
        if unit.shape[0] < min_group_rows:
            continue
        cos = unit @ unit.T
        np.fill_diagonal(cos, 0.0)
        partners = (cos >= SAME_DIRECTION_COSINE).sum(axis=1)
        largest = int(partners.max()) + 1
        if largest >= min_group_rows:
            out.append(f"{largest} rows of {name!r} {tuple(array.shape)} share one direction "
                       "(an imprint/binning layer)")
    return out
