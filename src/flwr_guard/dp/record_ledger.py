"""A durable, node-local ledger of record-level DP-SGD steps (no Flower imports).

Flower keeps ``context.state`` in the SuperNode's memory: a SuperNode restart (or a new
run) starts it empty, so an accountant kept only there forgets the epsilon already spent
on the node's data and lets it train again from zero. :class:`RecordLedger` keeps the
Opacus accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` in a JSON
file on the node itself:

- **where**: a directory chosen by the node (node config ``dp-sgd-ledger``; by default
  ``$FLWR_HOME/flwr-guard/dp-sgd-ledger``, ``~/.flwr`` when ``FLWR_HOME`` is unset),
  never by the server (the run config is the server's: a server that could choose the
  path could point a node at a fresh ledger);
- **keyed by dataset**: one file per fingerprint of the training data
  (:func:`dataset_fingerprint`, SHA-256 of every example), named
  ``dpsgd-<fingerprint[:32]>.json``; the file also records the node ids that trained on
  it. The budget belongs to the records: Flower may give a restarted SuperNode a new node
  id, so the node id is recorded, not used as the key;
- **atomic**: written to a temporary file in the same directory, fsync'ed, then
  ``os.replace``'d, so a crash leaves the old or the new ledger, never half of one;
- **reserved before training**: :meth:`RecordLedger.reserve` writes a round's planned
  steps *before* the data is touched; a crash mid-training, or empty Poisson batches
  that the training loop skips, are still in the ledger (the data was sampled);
- **missing when expected is an error**: :class:`LedgerMissing` when the file is absent
  but the node has evidence that it trained before (a history in ``context.state``, or
  the node config's ``dp-sgd-ledger-required``), or when the file holds fewer steps than
  that evidence; only an explicit reset (``dp-sgd-ledger-reset``) starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flwr_guard.errors import FlwrGuardError

LEDGER_VERSION = 1
History = list[tuple[float, float, int]]


class LedgerMissing(FlwrGuardError, RuntimeError):
    """The node's record-level ledger is expected but absent (or rolled back)."""


def default_ledger_dir() -> Path:
    """``$FLWR_HOME/flwr-guard/dp-sgd-ledger`` (``FLWR_HOME`` defaults to ``~/.flwr``)."""
    home = os.environ.get("FLWR_HOME") or os.path.join(os.path.expanduser("~"), ".flwr")
    return Path(home) / "flwr-guard" / "dp-sgd-ledger"


def _update_hash(h: Any, value: Any) -> None:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        h.update(str(value.dtype).encode())
        h.update(str(value.shape).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(b"(")
        for v in value:
            _update_hash(h, v)
        h.update(b")")
    elif isinstance(value, (int, float, str, bool, np.generic)):
        h.update(repr(value).encode())
    else:
        raise TypeError(f"cannot fingerprint a dataset item of type {type(value).__name__}")


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 hex digest of a dataset's examples, in order.

    Args:
        dataset: a ``torch.utils.data.TensorDataset`` (its tensors are hashed whole) or
            any map-style dataset whose items are tensors, NumPy arrays, numbers, strings
            or tuples of them.

    Raises:
        TypeError: for items it cannot hash (pass ``fingerprint=`` to :class:`DPSGD`).
    """
    h = hashlib.sha256(b"flwr-guard-dataset-v1")
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        _update_hash(h, tuple(tensors))
    else:
        for i in range(len(dataset)):
            _update_hash(h, dataset[i])
    return h.hexdigest()


def _check_history(history: Iterable[Sequence[Any]]) -> History:
    out: History = []
    for entry in history:
        z, q, n = entry
        z, q, n = float(z), float(q), int(n)
        if not (z >= 0 and 0 <= q <= 1 and n >= 0):
            raise ValueError(f"invalid ledger entry {(z, q, n)}")
        out.append((z, q, n))
    return out


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


class RecordLedger:
    """The record-level ledger of one dataset on one node, on disk.

    Args:
        directory: the node's ledger directory (created on first write).
        fingerprint: :func:`dataset_fingerprint` of the training data.
        node_id: recorded in the file (informational).
        expected_history: what the node's memory (``context.state``) says it already
            spent on this data; the file must hold at least as many steps.
        required: the node declares that a ledger must exist (node config
            ``dp-sgd-ledger-required``): a missing file is an error.
        reset: start a new, empty ledger when the expected one is missing (node config
            ``dp-sgd-ledger-reset``); never discards a ledger that exists.

    Raises:
        LedgerMissing: the file is absent although expected, or holds fewer steps than
            ``expected_history``, and ``reset`` is false.
        ValueError: the file is unreadable or was written for another fingerprint.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fingerprint: str,
        node_id: int | None = None,
        expected_history: Sequence[Sequence[Any]] | None = None,
        required: bool = False,
        reset: bool = False,
    ) -> None:
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"fingerprint must be a hex digest, got {fingerprint!r}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.path = self.directory / f"dpsgd-{fingerprint[:32]}.json"
        self.node_ids: list[int] = []
        self.history: History = []
        expected = _check_history(expected_history or [])
        if self.path.exists():
            self._load()
            if _steps(self.history) < _steps(expected) and not reset:
                raise LedgerMissing(
                    f"the record-level ledger {self.path} holds {_steps(self.history)} "
                    f"DP-SGD steps, but this node already ran {_steps(expected)} on this "
                    "data (restored from an older copy?); refusing to train. Restore the "
                    "latest ledger, or set node config dp-sgd-ledger-reset=true to accept "
                    "the node's in-memory history"
                )
            if _steps(self.history) < _steps(expected):
                self.history = list(expected)
        elif (expected or required) and not reset:
            why = ("this node already trained on this data (context.state)" if expected
                   else "the node config sets dp-sgd-ledger-required")
            raise LedgerMissing(
                f"the record-level ledger {self.path} is missing but expected ({why}): "
                "the epsilon already spent on this data would be forgotten; refusing to "
                "train. Restore the ledger file, or reset it explicitly with node config "
                "dp-sgd-ledger-reset=true"
            )
        else:
            self.history = list(expected)
        if node_id is not None and int(node_id) not in self.node_ids:
            self.node_ids.append(int(node_id))

    @property
    def steps(self) -> int:
        """Noised optimiser steps recorded, all rounds and runs together."""
        return _steps(self.history)

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` steps *before* they run, and write the file."""
        append_steps(self.history, (noise_multiplier, sample_rate, steps))
        self.save()

    def save(self) -> None:
        """Write the ledger atomically (tempfile in the same directory + ``os.replace``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {
            "version": LEDGER_VERSION,
            "fingerprint": self.fingerprint,
            "node-ids": self.node_ids,
            "history": [list(e) for e in self.history],
        }
        with tempfile.NamedTemporaryFile(
            "w", dir=self.directory, prefix=".dpsgd-", suffix=".tmp", delete=False,
            encoding="utf-8",
        ) as tmp:
            json.dump(data, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, self.path)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            history = _check_history(data["history"])
            node_ids = [int(i) for i in data.get("node-ids", [])]
            fingerprint = str(data["fingerprint"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"cannot read the record-level ledger {self.path}: {err}; refusing to train "
                "(restore the file; deleting it forgets the epsilon already spent)"
            ) from err
        if fingerprint != self.fingerprint:
            raise ValueError(f"ledger {self.path} was written for dataset {fingerprint[:16]}..., "
                             f"not {self.fingerprint[:16]}...")
        self.history, self.node_ids = history, node_ids
