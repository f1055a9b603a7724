"""What of the node's configuration the app's process gets: not the node's own policy.

Core (no Flower imports). The node config is the operator's; under the node guard the
keys its policy owns stay with the guard (:func:`app_node_config`):

- every ``guard-*`` key (the policy, the FAB allow-list) and every ``secagg-*`` key
  (the SecAgg+ floors, the signing key and roster files): enforced by the guard's mods;
- the user-level DP floors the guard's mods enforce: ``dp-min-noise-multiplier``,
  ``dp-honest-contributors`` (:mod:`flwr_guard.dp.keys`);
- the record-level ledger's location, ``dp-sgd-ledger`` (:mod:`flwr_guard.dp.node_policy`).

What the app keeps: everything else, including the record-level floors its own DP-SGD
must honour (``dp-sgd-max-epsilon``, ``dp-sgd-min-noise-multiplier``,
``dp-sgd-secure-mode``: record-level DP-SGD lives in the training loop and cannot be
imposed from outside), the ledger's name (``dp-sgd-data-source``) and the removed
``dp-sgd-ledger-reset``, so that the app's DP-SGD refuses it naming the fix. The ledger itself
is handed out as a copy (:class:`LedgerHandout`): the app's ``dp-sgd-ledger`` names a
fresh directory holding a copy of the node's ledger file; after the app's process has
exited the guard writes the copy back only when it *extends* the node's history (the
steps the app reserved are appended, nothing earlier changed). An app that deleted,
reset or rewrote its copy leaves the node's ledger as it was and its reply is refused.
A missing or corrupt node ledger is not copied (the app's DP-SGD refuses, naming
``flwr-guard ledger init`` with the node's real directory in the reason).

Limits: the copy is a file the app's OS user can read, like the node's own ledger (the
process boundary is not a user boundary, docs/threat-model.md); two apps running at
once on one node each append their own new steps to the node's ledger as it is when
they finish, under an exclusive file lock (no spending is lost), but each checked the
budget against its own copy: concurrent runs can together spend past the node's cap.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr_guard.dp.node_policy import data_source
from flwr_guard.dp.record_ledger import (
    LedgerMissing,
    RecordLedger,
    append_steps,
    default_ledger_dir,
    ledger_path,
)
from flwr_guard.keys import NodeConfig

#: Node-config key prefixes the app never sees (the guard's policy and SecAgg+).
PRIVATE_PREFIXES = (NodeConfig.GUARD_PREFIX, NodeConfig.SECAGG_PREFIX)
#: Further node-config keys the app never sees (the node's DP policy and ledger).
PRIVATE_KEYS = frozenset({NodeConfig.DP_MIN_NOISE_MULTIPLIER, NodeConfig.GUARD_MIN_NOISE_MULTIPLIER,
                          NodeConfig.DP_HONEST_CONTRIBUTORS, NodeConfig.DP_SGD_LEDGER})
LEDGER_REFUSAL = "flwr-guard node: the app rewrote its copy of the node's record-level ledger"


def is_private(key: str) -> bool:
    """Whether node-config ``key`` belongs to the node's policy (never shown to the app)."""
    return key.startswith(PRIVATE_PREFIXES) or key in PRIVATE_KEYS


def app_node_config(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config the app sees: ``node_config`` without :func:`is_private` keys."""
    return {k: v for k, v in node_config.items() if not is_private(k)}


def _history(path: Path) -> list[tuple[float, float, int]] | None:
    """The ledger file's history, or ``None`` when it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [(float(z), float(q), int(n)) for z, q, n in data["history"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def appended(old: Sequence[tuple[float, float, int]], new: Sequence[tuple[float, float, int]]
             ) -> list[tuple[float, float, int]]:
    """The steps ``new`` adds to ``old`` (``extends(old, new)`` must hold)."""
    if not old:
        return list(new)
    k = len(old) - 1
    grown = new[k][2] - old[k][2]
    return ([(new[k][0], new[k][1], grown)] if grown else []) + list(new[k + 1:])


def extends(old: Sequence[tuple[float, float, int]], new: Sequence[tuple[float, float, int]]) -> bool:
    """Whether ``new`` is ``old`` with steps appended: later entries added, and the last
    entry's count grown when ``(z, q)`` repeat (:func:`flwr_guard.dp.record_ledger.append_steps`
    merges those)."""
    if len(new) < len(old):
        return False
    if not old:
        return True
    *head, (z, q, n) = old
    z2, q2, n2 = new[len(old) - 1]
    return list(new[:len(head)]) == head and (z2, q2) == (z, q) and n2 >= n


@contextmanager
def _locked(directory: Path, source: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<ledger>.lock`` next to the node's ledger (POSIX
    advisory lock, held by every write-back of the node guard)."""
    lock = ledger_path(directory, source).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class LedgerHandout:
    """The node's ledger handed to the app's process as a copy (see the module docstring).

    Args:
        node_config: the node's full node config (``dp-sgd-ledger``, ``dp-sgd-data-source``).

    Attributes:
        node_config: the entries to add to the app's node config (``dp-sgd-ledger``: the
            copy's directory).
    """

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        self.real_dir = Path(str(node_config.get(NodeConfig.DP_SGD_LEDGER, "") or "") or default_ledger_dir())
        self.copy_dir = Path(tempfile.mkdtemp(prefix="flwr-guard-ledger-"))
        self.node_config = {NodeConfig.DP_SGD_LEDGER: str(self.copy_dir)}
        self.source: str | None = None
        self.original: list[tuple[float, float, int]] | None = None
        try:
            self.source = data_source(node_config)
            real = ledger_path(self.real_dir, self.source)
        except ValueError:
            return  # the app's DP-SGD raises the same error, naming the key
        self.original = _history(real) if real.exists() else None
        if self.original is not None:
            shutil.copy2(real, ledger_path(self.copy_dir, self.source))

    def reason(self, text: str) -> str:
        """``text`` with the copy's directory replaced by the node's (a refusal names
        the command that fixes the node's ledger, not the copy)."""
        return text.replace(str(self.copy_dir), str(self.real_dir))

    def take_back(self, node_id: int | None = None) -> str | None:
        """Append the app's new steps to the node's ledger; remove the copy.

        Returns:
            ``None`` when the node's ledger is as it should be (unchanged, or extended by
            the steps the app reserved); else the reason the reply must be refused (the
            copy was deleted, reset or rewritten: the node's ledger is left as it was).
        """
        try:
            if self.source is None or self.original is None:
                return None  # no readable node ledger was handed out: nothing to take back
            copy = ledger_path(self.copy_dir, self.source)
            new = _history(copy) if copy.exists() else None
            if new is None or not extends(self.original, new):
                what = "deleted or unreadable" if new is None else "no longer extends the node's"
                return (f"{LEDGER_REFUSAL} ({what} {sum(n for *_, n in self.original)} "
                        f"steps): the node keeps its ledger "
                        f"{ledger_path(self.real_dir, self.source)} as it was and sends nothing")
            steps = appended(self.original, new)
            if steps:
                # Appended to the ledger as it is now (another app's steps, written while
                # this one ran, stay), under an exclusive lock so that two write-backs
                # never interleave their read and write: spending is never lost.
                with _locked(self.real_dir, self.source):
                    try:
                        ledger = RecordLedger(self.real_dir, self.source, node_id=node_id)
                    except LedgerMissing as err:  # deleted or corrupted while the app ran
                        return f"{LEDGER_REFUSAL}'s steps cannot be recorded: {err}"
                    try:
                        for entry in steps:
                            append_steps(ledger.history, entry)
                    except (TypeError, ValueError) as err:  # NaN or negative counts
                        return f"{LEDGER_REFUSAL} with steps the ledger refuses ({err})"
                    ledger.save()
            return None
        finally:
            shutil.rmtree(self.copy_dir, ignore_errors=True)
