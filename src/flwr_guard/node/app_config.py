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

Concurrent runs: while a copy is out the node's ledger is reserved for it
(:class:`~flwr_guard.dp.record_ledger.Reservation`, made by the guard before the app
starts, released when the copy is taken back): a second app of the same data source
starts only after the first app's steps are in the node's ledger, so its budget check
counts them and two runs together never spend past the node's cap. Under
``--app-isolation sandbox|user`` the copy belongs to the app's user and is the only
ledger file it can read (:mod:`flwr_guard.node.isolation`); the guard reads it back as
an untrusted file (no links, FIFOs or devices; bounded size).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr_guard.dp.node_policy import data_source
from flwr_guard.dp.record_ledger import (
    RESERVATION_WAIT_S,
    LedgerMissing,
    LedgerReserved,
    RecordLedger,
    Reservation,
    append_steps,
    check_history,
    default_ledger_dir,
    ledger_path,
)
from flwr_guard.keys import NodeConfig

logger = logging.getLogger("flwr_guard.node")

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


#: The largest ledger copy the guard reads back (bytes): the copy is the app's file.
MAX_COPY_BYTES = 16 << 20


def _history(path: Path) -> list[tuple[float, float, int]] | None:
    """The ledger file's history, or ``None`` when it cannot be read or holds entries
    the ledger refuses (:func:`_read_history`)."""
    history, _ = _read_history(path)
    return history


def _read_history(path: Path) -> tuple[list[tuple[float, float, int]] | None, str]:
    """``(history, "")``, or ``(None, why)`` when the file cannot be read. The file may
    be the app's (its copy): a symbolic link, a FIFO, a device or a file over
    :data:`MAX_COPY_BYTES` is not read; an entry out of the bounds of
    :func:`~flwr_guard.dp.record_ledger.check_entry` (an infinite or NaN noise
    multiplier, a sample rate outside (0, 1], absurd step counts) makes it unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        return None, f"deleted or unreadable: {err.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_COPY_BYTES:
            return None, "deleted or unreadable: not a regular file of at most 16 MiB"
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = json.loads(handle.read(MAX_COPY_BYTES + 1).decode("utf-8"))
        history = data["history"]
        if not isinstance(history, list):
            return None, "deleted or unreadable: its history is not a list"
        return check_history(history), ""
    except ValueError as err:
        return None, f"holds values the ledger refuses: {err}"
    except (OSError, KeyError, TypeError, AttributeError) as err:
        return None, f"deleted or unreadable: {err!r}"
    finally:
        os.close(fd)


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


def _write_copy(real: Path, copy_dir: Path, name: str, owner: tuple[int, int] | None) -> None:
    """Copy the node's ledger ``real`` to ``copy_dir/name`` without following a link:
    the directory is opened with ``O_NOFOLLOW`` and the copy created in it with
    ``O_EXCL | O_NOFOLLOW`` (an existing name, a planted link included, is an error,
    never written through); its mode and owner are set on the open descriptor.
    ``chmod`` before ``chown``: once the app's uid owns it, changing its mode would need
    CAP_FOWNER, which a guard with only the capabilities of ``--app-isolation user``
    (SETUID, SETGID, CHOWN, DAC_OVERRIDE) lacks.

    Raises:
        OSError: the directory is a link or the name exists (``EEXIST``, ``ELOOP``).
    """
    with open(real, "rb") as source_file:
        data = source_file.read()
    dir_fd = os.open(copy_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


#: The longest wait for the lock of a write-back to the node's ledger (seconds): a
#: write-back holds it for one small file write, so a longer wait means someone else
#: holds it (shorter than :data:`~flwr_guard.dp.record_ledger.RESERVATION_WAIT_S`).
LOCK_WAIT_S = 60.0


@contextmanager
def _locked(directory: Path, source: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``<ledger>.lock`` next to the node's ledger (POSIX
    advisory lock, held by every write-back of the node guard). The lock file is the
    guard's, mode 0600 (created with ``O_NOFOLLOW``; an existing one is made 0600), so
    no other user can open it to hold the lock.

    Raises:
        LedgerReserved: still locked by another after ``wait_s`` seconds.
    """
    lock = ledger_path(directory, source).with_suffix(".lock")
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerReserved(
                        f"the lock {lock} of the node's record-level ledger stayed held for "
                        f"{wait_s:g} s by another process; nothing was written. Only the node "
                        f"guard should open it (mode 0600): check which process holds it "
                        f"(`fuser {lock}`)") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class LedgerHandout:
    """The node's ledger handed to the app's process as a copy (see the module docstring).

    While the copy is out the node's ledger is reserved for it
    (:class:`~flwr_guard.dp.record_ledger.Reservation`): a second handout of the same
    data source waits until this one is taken back, so its copy holds this app's steps
    and the app's budget check sees them. A reservation left by a guard that died with a
    copy out is settled first (the dead app's new steps are appended).

    Args:
        node_config: the node's full node config (``dp-sgd-ledger``, ``dp-sgd-data-source``).
        copy_dir: an empty directory for the copy (default: a new temporary one).
        owner: ``(uid, gid)`` the copy is given to (the app's user under
            ``--app-isolation sandbox|user``); ``None``: the guard's own user.
        holder: what the reservation records about this handout (run id, ...).
        wait_s: the longest wait for another handout of the same source (seconds).

    Attributes:
        node_config: the entries to add to the app's node config (``dp-sgd-ledger``: the
            copy's directory).

    Raises:
        LedgerReserved: the ledger stayed reserved by another handout past ``wait_s``.
    """

    def __init__(self, node_config: Mapping[str, Any], copy_dir: str | os.PathLike[str] | None = None,
                 owner: tuple[int, int] | None = None, holder: Mapping[str, Any] | None = None,
                 wait_s: float = RESERVATION_WAIT_S) -> None:
        self.real_dir = Path(str(node_config.get(NodeConfig.DP_SGD_LEDGER, "") or "") or default_ledger_dir())
        self.copy_dir = Path(copy_dir) if copy_dir is not None else Path(tempfile.mkdtemp(prefix="flwr-guard-ledger-"))
        self.node_config = {NodeConfig.DP_SGD_LEDGER: str(self.copy_dir)}
        self.source: str | None = None
        self.original: list[tuple[float, float, int]] | None = None
        self.reservation: Reservation | None = None
        self._owner = owner
        self._hand_out(node_config, holder, wait_s)
        try:
            self.hand_over()
        except BaseException:
            if self.reservation is not None:
                self.reservation.release()
            raise

    def _hand_out(self, node_config: Mapping[str, Any], holder: Mapping[str, Any] | None,
                  wait_s: float) -> None:
        owner = self._owner
        try:
            self.source = data_source(node_config)
            real = ledger_path(self.real_dir, self.source)
        except ValueError:
            return  # the app's DP-SGD raises the same error, naming the key
        if not real.exists():
            return  # the app's DP-SGD refuses, naming `flwr-guard ledger init`
        self.reservation = Reservation(self.real_dir, self.source, wait_s=wait_s,
                                       on_wait=self._log_wait)
        try:
            if self.reservation.leftover is not None:
                self._settle(self.reservation.leftover)
            self.original = _history(real)
            if self.original is None:
                return
            copy = ledger_path(self.copy_dir, self.source)
            _write_copy(real, self.copy_dir, copy.name, owner)
            self.reservation.record({**dict(holder or {}), "pid": os.getpid(), "since": time.time(),
                                     "copy": str(copy), "original": self.original})
        except BaseException:
            self.reservation.release()
            raise

    def hand_over(self) -> None:
        """(Done by the constructor.) Give the copy's directory to the app's user (``owner``), after the copy is in it.

        Until then the directory is the guard's (mode 0700): nothing the app's user runs
        (a process an earlier app left behind, a concurrent app of the same uid) can
        plant a link there for the guard to follow while it writes the copy as root.
        """
        if self._owner is None:
            return
        fd = os.open(self.copy_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_uid != self._owner[0]:
                os.fchmod(fd, 0o700)  # before the chown (see _write_copy)
                os.fchown(fd, *self._owner)
        finally:
            os.close(fd)

    def _log_wait(self, other: Mapping[str, Any]) -> None:
        logger.info("flwr-guard node: the record-level ledger of data source %r is reserved by "
                    "another app on this node (%s); this app starts when it is taken back",
                    self.source, {k: other[k] for k in ("run-id", "pid", "since") if k in other})

    def _settle(self, leftover: Mapping[str, Any]) -> None:
        """Append the new steps of a copy whose guard died before taking it back, and
        remove the dead handout's directory when it is one the guard made."""
        assert self.source is not None
        copy = Path(str(leftover.get("copy", "")))
        try:
            self._settle_copy(leftover, copy)
        finally:
            ours = copy.parent.name.startswith("flwr-guard-ledger-") or (
                copy.parent.name == "ledger" and copy.parent.parent.name.startswith("flwr-guard-app-"))
            if ours and str(copy) not in ("", "."):
                shutil.rmtree(copy.parent.parent if copy.parent.name == "ledger" else copy.parent,
                              ignore_errors=True)

    def _settle_copy(self, leftover: Mapping[str, Any], copy: Path) -> None:
        assert self.source is not None
        try:
            original = [(float(z), float(q), int(n)) for z, q, n in leftover.get("original", [])]
        except (TypeError, ValueError):
            original = None
        new = _history(copy) if str(copy) not in ("", ".") else None
        if original is None or new is None or not extends(original, new):
            logger.warning("flwr-guard node: a guard (pid %s) died holding the record-level ledger "
                           "%s; its app's copy %s is gone or does not extend the ledger, so steps "
                           "that app may have spent are not recorded", leftover.get("pid"),
                           ledger_path(self.real_dir, self.source), copy)
            return
        steps = appended(original, new)
        with _locked(self.real_dir, self.source):
            ledger = RecordLedger(self.real_dir, self.source)
            for entry in steps:
                append_steps(ledger.history, entry)
            ledger.save()
        logger.warning("flwr-guard node: a guard (pid %s) died holding the record-level ledger %s; "
                       "the %d steps its app's copy %s gained are now recorded",
                       leftover.get("pid"), ledger.path, sum(n for *_, n in steps), copy)

    def reason(self, text: str) -> str:
        """``text`` with the copy's directory replaced by the node's (a refusal names
        the command that fixes the node's ledger, not the copy)."""
        return text.replace(str(self.copy_dir), str(self.real_dir))

    def take_back(self, node_id: int | None = None) -> str | None:
        """Append the app's new steps to the node's ledger; remove the copy; release the
        reservation.

        Returns:
            ``None`` when the node's ledger is as it should be (unchanged, or extended by
            the steps the app reserved); else the reason the reply must be refused (the
            copy was deleted, reset or rewritten: the node's ledger is left as it was).
        """
        try:
            if self.source is None or self.original is None:
                return None  # no readable node ledger was handed out: nothing to take back
            copy = ledger_path(self.copy_dir, self.source)
            new, why = _read_history(copy)
            if new is None or not extends(self.original, new):
                held = sum(n for *_, n in self.original)
                what = (f"{why}; the node's ledger holds {held} steps" if new is None
                        else f"no longer extends the node's {held} steps")
                return (f"{LEDGER_REFUSAL} ({what}): the node keeps its ledger "
                        f"{ledger_path(self.real_dir, self.source)} as it was and sends nothing")
            steps = appended(self.original, new)
            if steps:
                # Appended to the ledger as it is now, under an exclusive lock so that a
                # write-back never interleaves with another writer's: spending is never lost.
                try:
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
                except LedgerReserved as err:
                    return f"{LEDGER_REFUSAL}'s steps cannot be recorded: {err}"
            return None
        finally:
            shutil.rmtree(self.copy_dir, ignore_errors=True)
            if self.reservation is not None:
                self.reservation.release()
