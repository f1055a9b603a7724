"""A node-local, monotonic record of the last round a client sent a masked input for
(no Flower imports).

Why: a client's replay guard (a second input for the same round is refused) lives in
its saved state (``context.state``) next to its keys. A node whose state is restored
from a snapshot taken before its round-r input would mask a second round-r input under
the same pair masks; with both self-mask seeds revealed, the server learns the
difference of the two inputs exactly. This ledger keeps, **outside** that state, in a
file of the node operator's choosing (node config ``secagg-round-ledger``, an absolute
path), the last round of each session (key: the session digest) and of each per-round
context (key: the round context digest), with the time the client opened that session
or context (its own clock, from its saved state). The round is written and
``fsync``-ed (file, then its directory) **before** the masked input leaves the node;
a round not above the recorded one is refused.

Forgetting (docs/secagg.md, "Storage rollback"): the file keeps the :data:`MAX_ENTRIES`
keys written last; the server chooses how many keys there are (every per-round context
and every re-key is one), so dropping one must not let its context answer again. When
an entry is dropped the ledger raises its horizon ``forgotten_before`` to that entry's
opening time; a key the ledger does not hold is then accepted only for a session or
context opened **after** the horizon. A rolled-back state carries the same opening
time as the entry that was dropped (it is the same session), so it is refused whatever
the clock does; the cost: a session or context opened before the horizon that has no
entry yet is refused too (its error starts with
:data:`~flwr_guard.secagg.constants.UNKNOWN_SESSION`: the server re-keys).

An entry's name is the node id and the digest (``"<node id>:<digest hex>"``): a
session digest is the same on every member, so two nodes given one file keep apart.
Writes go to a fresh temporary file in the same directory (``mkstemp``: ``O_EXCL``,
mode 0600, never a symlink) replaced atomically; the lock file (``fcntl.flock``, POSIX;
it serialises ClientApp processes of one node) is opened with ``O_NOFOLLOW``, mode 0600.

Limits: it helps only if the file is not rolled back together with the state (another
volume or device, or storage with no snapshots); a deleted or replaced file looks like
a first use and protects nothing.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from flwr_guard.secagg.constants import UNKNOWN_SESSION
from flwr_guard.secagg.errors import ProtocolError

MAX_ENTRIES = 4096
"""Keys kept in the ledger (the one written longest ago is dropped beyond it, and the
horizon ``forgotten_before`` rises to its opening time)."""

VERSION = 2


class RoundLedger:
    """The ledger file at ``path`` (absolute; created on first use; its directory must
    exist), as used by node ``node_id`` (the client's own id, part of every key).

    Raises:
        ProtocolError: ``path`` is relative (a ClientApp's working directory is not the
            operator's choice).
    """

    def __init__(self, path: str | os.PathLike[str], node_id: int) -> None:
        self.path = Path(path)
        if not self.path.is_absolute():
            raise ProtocolError(
                f"the SecAgg+ round ledger path {str(path)!r} is relative: set node config "
                "secagg-round-ledger to an absolute path on the node's persistent volume"
            )
        self.node_id = int(node_id)

    # -- reading ------------------------------------------------------------------------
    def _read(self) -> tuple[dict[str, list[float]], float]:
        """(key hex -> [round, opened_at], forgotten_before) of the file (empty: none)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, -math.inf
        except OSError as err:
            raise ProtocolError(f"the SecAgg+ round ledger {self.path} cannot be read: {err}") from None
        try:
            data = json.loads(text)
            if isinstance(data, dict) and data.get("version") == 1:
                data = _from_version_1(data, self.path.stat().st_mtime)
            entries = data["rounds"]
            horizon = data["forgotten_before"]
            if data.get("version") != VERSION or not isinstance(entries, dict) or not all(
                    isinstance(k, str) and isinstance(v, list) and len(v) == 2
                    and _is_int(v[0]) and _is_number(v[1]) for k, v in entries.items()
            ) or not (_is_number(horizon) or horizon is None):
                raise ValueError("unexpected layout")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
            raise ProtocolError(
                f"the SecAgg+ round ledger {self.path} is unreadable ({err}); no input is sent "
                "until the operator repairs or removes it (removing it forgets every round)"
            ) from None
        return {k: [int(v[0]), float(v[1])] for k, v in entries.items()}, (
            -math.inf if horizon is None else float(horizon))

    def _key(self, key: bytes) -> str:
        """The entry's name: this node's id and the digest (a session digest is the same on
        every member, so two nodes given one file keep apart)."""
        return f"{self.node_id}:{key.hex()}"

    def last(self, key: bytes) -> int:
        """The last round recorded for ``key`` (``-1``: none).

        Raises:
            ProtocolError: the file cannot be read or parsed.
        """
        entries, _ = self._read()
        return int(entries.get(self._key(key), [-1, 0.0])[0])

    def check(self, key: bytes, server_round: int, opened_at: float) -> None:
        """Raise unless an input for ``server_round`` of the session or context ``key``,
        opened at ``opened_at`` (seconds, ``time.time()`` of the client's saved state),
        may be sent (called before training; :meth:`advance` checks again).

        Raises:
            ProtocolError: the round is not above the recorded one, or ``key`` is not
                held and the context was opened before the horizon (forgotten), or the
                file cannot be read or parsed.
        """
        entries, horizon = self._read()
        _refuse(self.path, entries, horizon, self._key(key), server_round, opened_at)

    # -- writing ------------------------------------------------------------------------
    def advance(self, key: bytes, server_round: int, opened_at: float) -> None:
        """Record ``server_round`` for ``key``, durably, before an input of it is sent.

        Raises:
            ProtocolError: as :meth:`check`, or the file cannot be written.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise ProtocolError(
                f"the SecAgg+ round ledger {self.path} cannot be written: its lock file "
                f"{lock_path} cannot be opened (a symlink there is refused): {err}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries, horizon = self._read()
            _refuse(self.path, entries, horizon, self._key(key), server_round, opened_at)
            entries.pop(self._key(key), None)
            entries[self._key(key)] = [int(server_round), float(opened_at)]  # newest last
            while len(entries) > MAX_ENTRIES:
                dropped = entries.pop(next(iter(entries)))
                horizon = max(horizon, dropped[1])
            self._write({"version": VERSION, "forgotten_before": None if horizon == -math.inf else horizon,
                         "rounds": entries})
        except OSError as err:
            raise ProtocolError(f"the SecAgg+ round ledger {self.path} cannot be written: {err}") from None
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _refuse(path: Path, entries: dict[str, list[float]], horizon: float, key: str,
            server_round: int, opened_at: float) -> None:
    if not _is_number(opened_at) or not _is_int(server_round):
        raise ProtocolError(
            f"input for round {server_round!r} refused: the opening time {opened_at!r} or the "
            "round of the client's saved state is not a finite number (corrupt state)"
        )
    entry = entries.get(key)
    if entry is not None and server_round <= entry[0]:
        raise ProtocolError(
            f"input for round {server_round} refused: this node's round ledger records an "
            f"input for round {int(entry[0])} of this session already (replayed round, or "
            f"the node's state was rolled back): {path}"
        )
    if entry is None and not float(opened_at) > horizon:
        raise ProtocolError(
            f"{UNKNOWN_SESSION}: input for round {server_round} refused: this node's round "
            f"ledger ({path}) has "
            f"forgotten the sessions and round contexts opened before {horizon:.3f} (more than "
            f"{MAX_ENTRIES} were used since), and this one was opened at {float(opened_at):.3f}: "
            "its last round is unknown (the node's state may have been rolled back); the "
            "server must re-key"
        )


def _from_version_1(data: dict[str, Any], written_at: float) -> dict[str, Any]:
    """A version-1 file (digest -> round; no node id, no opening times) read as version 2:
    its entries cannot be matched to a node, so they are dropped and the horizon is set to
    the file's last write (every entry's context was opened before it; a context opened
    before it is refused unless it is recorded again)."""
    if not isinstance(data.get("rounds"), dict):
        raise ValueError("unexpected layout")
    return {"version": VERSION, "forgotten_before": written_at, "rounds": {}}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


__all__ = ["MAX_ENTRIES", "RoundLedger"]
