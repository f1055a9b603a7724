"""The node's record-level DP-SGD ledger: one per declared data source (no Flower imports).

Flower keeps ``context.state`` in the SuperNode's memory: a SuperNode restart (or a new
run) starts it empty, so an accountant kept only there forgets the epsilon already spent
on the node's data. :class:`RecordLedger` keeps the Opacus accountant history
``[(noise_multiplier, sample_rate, steps), ...]`` in a JSON file on the node itself:

- **keyed by what the operator declares**: one file per data source,
  ``<dp-sgd-ledger>/<source>.json``, the source id from node config
  ``dp-sgd-data-source`` (default ``partition-<partition-id>``, else ``default``: one
  ledger per node; :func:`flwr_guard.dp.node_policy.data_source`). Never by anything the
  run config can change: which records a run trains on (``seed``, ``test-fraction``,
  partitioner, order) does not give the source a fresh budget;
- **composition over subsets**: a round that trains on any subset ``S`` of the source
  adds ``(z, q, steps)`` with ``q = batch / |S|`` (Opacus' Poisson rate over ``S``) to the
  one ledger, and epsilon is Opacus' RDP (or PRV) accountant over the whole history.
  For one record ``x`` of the source, a round whose subset holds ``x`` is a
  Poisson-subsampled Gaussian at rate ``q`` (Mironov, Talwar & Zhang 2019), a round
  whose subset does not hold it costs nothing; RDP composes additively (Mironov 2017,
  Prop. 1), so charging every round to every record (the worst record is in every
  subset) upper-bounds each record's RDP. Assumption: the subset is chosen without
  looking at the records' values (index- or partition-based selection, as Flower's
  partitioners do), so neighbouring sources differ in ``x`` only inside the rounds
  that used it;
- **created explicitly**: ``flwr-guard ledger init --dir DIR --source ID``
  (:func:`init_ledger`) writes an empty ledger; a missing or unreadable ledger is refused
  (:class:`LedgerMissing`, :class:`LedgerCorrupt`) with that command in the message,
  never recreated (a deleted ledger would otherwise restart at epsilon 0). Only Flower's
  simulation runtime (one process tree, one operator) creates a missing one itself;
- **atomic, reserved before training, never rewritten by a refusal**: written to a
  temporary file in the same directory, fsync'ed, then ``os.replace``'d; a round's
  planned steps are written *before* the data is touched (a crash or skipped empty
  Poisson batches still count); loading and refusing never write;
- **one holder at a time while a copy is out** (:class:`Reservation`): the node guard
  hands an app a *copy* of the ledger (:class:`flwr_guard.node.app_config.LedgerHandout`)
  and reserves the ledger for that copy until it is taken back, an exclusive ``flock``
  on ``<source>.reservation`` held for the app's whole run. A second app of the same
  data source waits for it, so it checks its budget against a history that already
  holds the first app's steps: concurrent runs can never spend past the cap together.
  The reservation file records its holder (process, copy, the history handed out); a
  holder that died without settling (its lock is gone with its process) leaves that
  record, and the next holder settles the dead one's copy first (its new steps are
  appended, never lost).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr_guard.dp.json_file import read_json, write_json_atomically
from flwr_guard.errors import FlwrGuardError

LEDGER_VERSION = 2
History = list[tuple[float, float, int]]
INIT_COMMAND = "flwr-guard ledger init"
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

logger = logging.getLogger(__name__)


class LedgerMissing(FlwrGuardError, RuntimeError):
    """The node's record-level ledger is absent (or older than the node's memory)."""


class LedgerCorrupt(LedgerMissing):
    """The node's record-level ledger exists but cannot be read."""


class LedgerReserved(FlwrGuardError, RuntimeError):
    """The ledger stayed reserved by another holder for longer than the wait."""


def default_ledger_dir() -> Path:
    """``$FLWR_HOME/flwr-guard/dp-sgd-ledger`` (``FLWR_HOME`` defaults to ``~/.flwr``)."""
    home = os.environ.get("FLWR_HOME") or os.path.join(os.path.expanduser("~"), ".flwr")
    return Path(home) / "flwr-guard" / "dp-sgd-ledger"


def check_source(source: str) -> str:
    """Validate a data-source id (letters, digits, ``._-``, at most 128; a file name).

    Raises:
        ValueError: naming node config ``dp-sgd-data-source``.
    """
    if not isinstance(source, str) or not _SOURCE.match(source):
        raise ValueError(f"node config dp-sgd-data-source must be 1-128 letters, digits, "
                         f"'.', '_' or '-' (starting with a letter or digit), got {source!r}")
    return source


def ledger_path(directory: str | os.PathLike[str], source: str) -> Path:
    """``directory / f"{source}.json"``."""
    return Path(directory) / f"{check_source(source)}.json"


def init_command(directory: str | os.PathLike[str], source: str) -> str:
    """The shell command that creates this ledger (named in every refusal)."""
    return f"{INIT_COMMAND} --dir {directory} --source {source}"


#: The largest noise multiplier a ledger entry may hold (a step at ``z`` above this
#: costs no measurable epsilon; larger values are refused as corrupt or hostile).
MAX_NOISE_MULTIPLIER = 1e6
#: The most steps one ledger entry may hold (far beyond any real training run).
MAX_STEPS = 10**9


def check_entry(entry: Sequence[Any]) -> tuple[float, float, int]:
    """One ledger entry ``(noise_multiplier, sample_rate, steps)``, checked: finite
    ``0 < noise_multiplier <= MAX_NOISE_MULTIPLIER``, ``0 < sample_rate <= 1``, an
    integer ``0 <= steps <= MAX_STEPS`` (0: a no-op entry). Opacus' accountants never
    return on a non-finite multiplier (and overflow on absurd ones), so every entry is
    checked where it enters or is read.

    Raises:
        ValueError: naming the entry and the bound it breaks.
    """
    try:
        z, q, n = entry
        z, q = float(z), float(q)
        if isinstance(n, bool) or not float(n).is_integer():
            raise ValueError("steps not an integer")
        n = int(n)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"invalid ledger entry {entry!r}: {err}") from None
    if not (math.isfinite(z) and 0 < z <= MAX_NOISE_MULTIPLIER):
        raise ValueError(f"invalid ledger entry {(z, q, n)}: the noise multiplier must be finite, "
                         f"> 0 and <= {MAX_NOISE_MULTIPLIER:g}")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"invalid ledger entry {(z, q, n)}: the sample rate must be in (0, 1]")
    if not 0 <= n <= MAX_STEPS:
        raise ValueError(f"invalid ledger entry {(z, q, n)}: the steps must be in [0, {MAX_STEPS}]")
    return z, q, n


def check_history(history: Iterable[Sequence[Any]]) -> History:
    """Every entry of ``history`` checked by :func:`check_entry`.

    Raises:
        ValueError: an entry out of bounds, or ``history`` is not a list of entries.
    """
    try:
        entries = list(history)
    except TypeError as err:
        raise ValueError(f"invalid ledger history: {err}") from None
    return [check_entry(entry) for entry in entries]


_check_history = check_history


def append_steps(history: History, entry: tuple[float, float, int]) -> None:
    """Append ``(z, q, steps)``, merged into the last entry when ``z`` and ``q`` match
    (as Opacus' accountants do)."""
    (z, q, n), = _check_history([entry])
    if history and history[-1][:2] == (z, q):
        history[-1] = (z, q, history[-1][2] + n)
    else:
        history.append((z, q, n))


def _steps(history: Iterable[tuple[float, float, int]]) -> int:
    return sum(n for _, _, n in history)


def init_ledger(directory: str | os.PathLike[str], source: str, force: bool = False) -> Path:
    """Create the empty ledger of ``source`` in ``directory``; return its path.

    Args:
        directory: the node's ledger directory (node config ``dp-sgd-ledger``).
        source: the data-source id (node config ``dp-sgd-data-source``).
        force: overwrite an existing ledger (forgets the epsilon it holds: only for a
            new data source, or a corrupt file whose records were never trained on).

    Raises:
        FileExistsError: the ledger exists and ``force`` is false.
        ValueError: an invalid source id.
    """
    path = ledger_path(directory, source)
    # The node's ledger directory: the guard's alone (no other user may open the
    # ledger's lock or reservation files to hold them).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() and not force:
        raise FileExistsError(
            f"the record-level ledger {path} exists: it keeps the epsilon already spent on "
            "this data source; pass --force only to start it again from 0 on purpose")
    write_json_atomically(path, prefix=".ledger-", data={
        "version": LEDGER_VERSION, "source": source, "created": time.time(),
        "node-ids": [], "history": []})
    return path


class RecordLedger:
    """The record-level ledger of one data source on one node, on disk.

    Args:
        directory: the node's ledger directory.
        source: the data-source id (:func:`flwr_guard.dp.node_policy.data_source`).
        node_id: recorded in the file on the next write (informational).
        expected_history: what the node's memory (``context.state``) says it already
            spent on this source; the file must hold at least as many steps.
        create_missing: create a missing ledger (Flower's simulation runtime only).

    Raises:
        LedgerMissing: the file is absent, or holds fewer steps than
            ``expected_history`` (restored from an older copy); the message names
            ``flwr-guard ledger init``.
        LedgerCorrupt: the file cannot be read (or belongs to another source).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        source: str,
        node_id: int | None = None,
        expected_history: Sequence[Sequence[Any]] | None = None,
        create_missing: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.source = check_source(source)
        self.path = ledger_path(directory, source)
        self.node_ids: list[int] = []
        self.history: History = []
        self.meta: dict[str, Any] = {}
        expected = _check_history(expected_history or [])
        if not self.path.exists():
            if not create_missing:
                raise LedgerMissing(
                    f"the record-level ledger {self.path} is missing: DP-SGD is refused until "
                    f"the node operator creates it with `{init_command(self.directory, source)}` "
                    "(or restores the deleted file; a new ledger starts the data source at "
                    "epsilon 0)"
                )
            logger.warning("flwr-guard: creating the record-level ledger %s (Flower "
                           "simulation; a deployed node needs `%s`)", self.path,
                           init_command(self.directory, source))
            init_ledger(self.directory, source)
        self._load()
        if _steps(self.history) < _steps(expected):
            raise LedgerMissing(
                f"the record-level ledger {self.path} holds {_steps(self.history)} DP-SGD "
                f"steps, but this node already ran {_steps(expected)} on this data source "
                "(restored from an older copy, or deleted and re-created?); refusing to "
                "train. Restore the latest ledger file; re-creating it with "
                f"`{init_command(self.directory, source)} --force` forgets the epsilon spent"
            )
        if node_id is not None and int(node_id) not in self.node_ids:
            self.node_ids.append(int(node_id))

    @property
    def steps(self) -> int:
        """Noised optimiser steps recorded, all rounds and runs together."""
        return _steps(self.history)

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int,
                delta: float | None = None, accountant: str | None = None) -> None:
        """Record ``steps`` steps *before* they run, and write the file (``delta`` and
        ``accountant``: what the budget was checked with, kept for the node's log)."""
        append_steps(self.history, (noise_multiplier, sample_rate, steps))
        if delta is not None:
            self.meta["delta"] = float(delta)
        if accountant is not None:
            self.meta["accountant"] = str(accountant)
        self.save()

    def save(self) -> None:
        """Write the ledger atomically (tempfile in the same directory + ``os.replace``)."""
        write_json_atomically(self.path, prefix=".ledger-", data={
            "version": LEDGER_VERSION,
            "source": self.source,
            **self.meta,
            "node-ids": self.node_ids,
            "history": [list(e) for e in self.history],
        })

    def _load(self) -> None:
        fix = (f"restore the file from a backup, or re-create it with "
               f"`{init_command(self.directory, self.source)} --force` (forgets the epsilon "
               "already spent)")
        try:
            data = read_json(self.path)
            if data.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {LEDGER_VERSION}")
            history = _check_history(data["history"])
            node_ids = [int(i) for i in data.get("node-ids", [])]
            source = str(data["source"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as err:
            raise LedgerCorrupt(
                f"cannot read the record-level ledger {self.path} ({err}); DP-SGD is refused: "
                f"{fix}") from err
        if source != self.source:
            raise LedgerCorrupt(f"the record-level ledger {self.path} belongs to data source "
                                f"{source!r}, not {self.source!r}: {fix}")
        self.history, self.node_ids = history, node_ids
        self.meta = {k: data[k] for k in ("created", "delta", "accountant") if k in data}


#: How long a new holder waits for a ledger reserved by another (seconds): the other
#: holder is an app's whole round, so this is generous; past it the message is refused.
RESERVATION_WAIT_S = 3600.0
_POLL_S = 0.1


class Reservation:
    """An exclusive reservation of one data source's ledger (see the module docstring).

    A POSIX advisory ``flock`` (LOCK_EX) on ``<directory>/<source>.reservation``, taken
    when the object is made and held until :meth:`release`; the kernel releases it when
    the holder's process dies. The file's content is the holder's record (JSON, written
    by :meth:`record`, emptied by :meth:`release`): a non-empty record found by the next
    holder is one a holder left without releasing (:attr:`leftover`).

    Args:
        directory: the node's ledger directory.
        source: the data-source id.
        wait_s: the longest wait for another holder (seconds).
        on_wait: called once with the other holder's record when this one has to wait.

    Attributes:
        leftover: the record of a holder that died holding the reservation, else ``None``.

    Raises:
        LedgerReserved: still held by another after ``wait_s`` (names the holder).
        OSError: the reservation file cannot be opened.
    """

    def __init__(self, directory: str | os.PathLike[str], source: str,
                 wait_s: float = RESERVATION_WAIT_S,
                 on_wait: Any = None) -> None:
        self.path = Path(directory) / f"{check_source(source)}.reservation"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + wait_s
        waited = False
        try:
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited and on_wait is not None:
                        on_wait(self._read())
                    waited = True
                    if time.monotonic() >= deadline:
                        raise LedgerReserved(
                            f"the record-level ledger of data source {source!r} in {directory} "
                            f"stayed reserved for {wait_s:g} s by {self._read() or 'another holder'} "
                            "(another run's app on this node); nothing was run, try the round again"
                        ) from None
                    time.sleep(_POLL_S)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self.leftover: dict[str, Any] | None = self._read() or None

    def _read(self) -> dict[str, Any]:
        assert self._fd is not None
        try:
            data = os.pread(self._fd, 1 << 22, 0)
            record = json.loads(data.decode("utf-8")) if data.strip() else {}
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def record(self, holder: dict[str, Any]) -> None:
        """Write this holder's record (what the next holder settles if this one dies)."""
        assert self._fd is not None, "released"
        data = json.dumps(holder).encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Empty the record and unlock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
