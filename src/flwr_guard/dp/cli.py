"""``flwr-guard epsilon``: epsilon of a subsampled Gaussian mechanism, or the noise for one.

Registered on the main ``flwr-guard`` command in :mod:`flwr_guard.cli`. The accounting
itself is :mod:`flwr_guard.dp.accounting` (dp-accounting), imported when the command runs.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer


class Accountant(str, Enum):
    rdp = "rdp"
    pld = "pld"


class Sampling(str, Enum):
    poisson = "poisson"
    none = "none"
    fixed_size = "fixed-size"


FLOATING_POINT = ("central Gaussian noise from float64 samples is exact only for ideal "
                  "reals (Mironov 2012): use DPFedAvg(secure_noise=True), distributed noise, "
                  "or Opacus secure_mode (dp-sgd-secure-mode) for DP-SGD")


def epsilon(
    sample_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Sampling rate q: clients per round / population "
        "(user level) or batch size / examples (DP-SGD).")],
    rounds: Annotated[int, typer.Option(
        min=1, help="Steps T: federated rounds (user level) or optimiser steps (DP-SGD).")],
    delta: Annotated[float, typer.Option(help="Target delta, in (0, 1).")] = 1e-5,
    noise_multiplier: Annotated[float | None, typer.Option(
        help="Noise multiplier z (noise std / clipping norm): print epsilon.")] = None,
    target_epsilon: Annotated[float | None, typer.Option(
        help="Instead of --noise-multiplier: print the noise multiplier reaching it.")] = None,
    accountant: Annotated[Accountant, typer.Option(
        help="rdp (dp-accounting RdpAccountant) or pld (PLDAccountant, tighter).")
    ] = Accountant.rdp,
    sampling: Annotated[Sampling, typer.Option(
        help="poisson (a trusted sampler; DP-SGD's data loader), none (no amplification: "
        "DPFedAvg's default, the only choice against a server that picks the cohort), or "
        "fixed-size (cohort drawn without replacement, replace-one; needs --population).")
    ] = Sampling.poisson,
    population: Annotated[int | None, typer.Option(
        min=1, help="Population N, for --sampling fixed-size.")] = None,
    contributors: Annotated[int | None, typer.Option(
        min=1, help="Distributed DP: n clients each adding 1/n of the noise variance; "
        "prints epsilon under add/remove of a client (its share leaves) and zero-out.")] = None,
    dimension: Annotated[int, typer.Option(
        min=1, help="With --contributors: noised coordinates d (the model's size).")] = 1,
) -> None:
    """Print epsilon for (z, q, T, delta), or with --target-epsilon the z that reaches it."""
    if contributors is not None:
        _distributed_epsilon(noise_multiplier, contributors, dimension, rounds, delta)
        return
    from flwr_guard.dp.accounting import (
        CONVERSION,
        NEIGHBOURING,
        compute_epsilon,
        noise_multiplier_for_epsilon,
    )

    if (noise_multiplier is None) == (target_epsilon is None):
        typer.echo("error: give exactly one of --noise-multiplier and --target-epsilon", err=True)
        raise typer.Exit(2)
    if sampling is Sampling.none:
        sample_rate = 1.0  # every step counts in full
    how = (f"accountant: {accountant.value} (dp-accounting), {sampling.value} sampling, "
           f"q={sample_rate:g}, T={rounds}, delta={delta:g}")
    notes = [f"neighbouring relation: {NEIGHBOURING[sampling.value]}",
             f"conversion: {CONVERSION[accountant.value]}",
             f"floating point: {FLOATING_POINT}"]
    try:
        if noise_multiplier is not None:
            eps = compute_epsilon(noise_multiplier, sample_rate, rounds, delta,
                                  accountant.value, sampling.value, population)
            typer.echo(f"epsilon = {eps:.4f}  (noise multiplier {noise_multiplier:g}; {how})")
            if sampling is Sampling.poisson and sample_rate < 1:
                fixed = compute_epsilon(noise_multiplier, 1.0, rounds, delta, accountant.value,
                                        "none")
                typer.echo(f"  without amplification (a fixed-size cohort as Flower samples "
                           f"it, or a server that picks the cohort): epsilon = {fixed:.4f}")
        else:
            assert target_epsilon is not None
            z = noise_multiplier_for_epsilon(target_epsilon, sample_rate, rounds, delta,
                                             accountant.value, sampling.value, population)
            eps = compute_epsilon(z, sample_rate, rounds, delta, accountant.value,
                                  sampling.value, population)
            typer.echo(f"noise multiplier = {z:.4f}  (epsilon {eps:.4f} <= target "
                       f"{target_epsilon:g}; {how})")
        for note in notes:
            typer.echo(f"  {note}")
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


def _distributed_epsilon(z: float | None, n: int, d: int, rounds: int, delta: float) -> None:
    from flwr_guard.dp.accounting import compute_epsilon
    from flwr_guard.dp.relation_accounting import ADD_REMOVE_ORDERS, add_remove_rdp
    from flwr_guard.dp.skellam_accounting import epsilon_from_rdp

    if z is None or not z > 0:
        typer.echo("error: --contributors needs --noise-multiplier > 0", err=True)
        raise typer.Exit(2)
    rdp = rounds * add_remove_rdp(ADD_REMOVE_ORDERS, 1.0, z * z / n, n, d)
    add_remove = epsilon_from_rdp(ADD_REMOVE_ORDERS, rdp, delta)
    zero_out = compute_epsilon(z, 1.0, rounds, delta, "rdp", "none")
    how = f"distributed DP, {n} contributors, d={d}, T={rounds}, delta={delta:g}, no amplification"
    typer.echo(f"epsilon = {add_remove:.4f}  (add/remove one client, its noise share leaves; "
               f"Gaussian analogue; {how})")
    typer.echo(f"epsilon = {zero_out:.4f}  (zero-out one client, its noise share stays; {how})")


ledger_app = typer.Typer(
    help="The node's record-level DP-SGD ledgers (created by the node operator).",
    no_args_is_help=True,
)


def _ledger_dir(directory: str | None) -> str:
    from flwr_guard.dp.record_ledger import default_ledger_dir

    return directory or str(default_ledger_dir())


@ledger_app.command("init")
def ledger_init(
    directory: Annotated[str | None, typer.Option(
        "--dir", help="Ledger directory: the node config's dp-sgd-ledger "
        "(default $FLWR_HOME/flwr-guard/dp-sgd-ledger).")] = None,
    source: Annotated[str, typer.Option(
        help="Data-source id: the node config's dp-sgd-data-source (default: "
        "partition-<partition-id>, else 'default').")] = "default",
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite an existing ledger (forgets the epsilon it holds).")] = False,
) -> None:
    """Create the empty record-level ledger of one data source (before DP-SGD can run)."""
    from flwr_guard.dp.record_ledger import init_ledger

    try:
        path = init_ledger(_ledger_dir(directory), source, force=force)
    except (FileExistsError, ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"created the record-level ledger {path} (data source {source!r}, epsilon 0)")


@ledger_app.command("show")
def ledger_show(
    directory: Annotated[str | None, typer.Option("--dir", help="Ledger directory.")] = None,
    source: Annotated[str, typer.Option(help="Data-source id.")] = "default",
    delta: Annotated[float | None, typer.Option(
        help="Delta (default: the one the last round was checked with).")] = None,
) -> None:
    """Print a ledger's steps and the record-level epsilon spent."""
    from flwr_guard.dp.dpsgd import opacus_epsilon
    from flwr_guard.dp.record_ledger import LedgerMissing, RecordLedger

    try:
        ledger = RecordLedger(_ledger_dir(directory), source)
    except (LedgerMissing, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    at = delta if delta is not None else float(ledger.meta.get("delta", 1e-5))
    accountant = str(ledger.meta.get("accountant", "rdp"))
    eps = opacus_epsilon(ledger.history, at, accountant)
    typer.echo(f"{ledger.path}: {ledger.steps} DP-SGD steps, epsilon {eps:.4f} at delta {at:g} "
               f"({accountant} accountant; relation: add/remove one record)")
