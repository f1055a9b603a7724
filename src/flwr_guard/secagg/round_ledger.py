"""A node-local, monotonic record of the last round a client sent a masked input for
(no Flower imports).

Why: a client's replay guard (a second input for the same round is refused) lives in
its saved state (``context.state``) next to its keys. A node whose state is restored
from a snapshot taken before its round-r input would mask a second round-r input under
the same pair masks; with both self-mask seeds revealed, the server learns the
difference of the two inputs exactly. This ledger keeps, **outside** that state, in a
file of the node operator's choosing (node config ``secagg-round-ledger``), the last
round of each session (key: the session digest) and of each per-round context (key:
the round context digest). The round is written and ``fsync``-ed (file, then its
directory) **before** the masked input leaves the node; a round not above the recorded
one is refused.

Limits (docs/secagg.md, "Storage rollback"): it helps only if the file is not rolled
back together with the state (another volume or device, or storage with no snapshots);
a deleted or replaced file looks like a first use and protects nothing; the newest
:data:`MAX_ENTRIES` keys are kept (older sessions are past every session cap anyway);
a lock file serialises ClientApp processes of one node (``fcntl.flock``, POSIX).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from flwr_guard.secagg.errors import ProtocolError

MAX_ENTRIES = 4096
"""Keys kept in the ledger (the oldest written is dropped beyond it)."""

VERSION = 1


class RoundLedger:
    """The ledger file at ``path`` (created on first use; its directory must exist)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, int]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise ProtocolError(f"the SecAgg+ round ledger {self.path} cannot be read: {err}") from None
        try:
            data = json.loads(text)
            entries = data["rounds"]
            if data.get("version") != VERSION or not isinstance(entries, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                    for k, v in entries.items()):
                raise ValueError("unexpected layout")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ProtocolError(
                f"the SecAgg+ round ledger {self.path} is unreadable ({err}); no input is sent "
                "until the operator repairs or removes it (removing it forgets every round)"
            ) from None
        return dict(entries)

    def last(self, key: bytes) -> int:
        """The last round recorded for ``key`` (``-1``: none).

        Raises:
            ProtocolError: the file cannot be read or parsed.
        """
        return self._read().get(key.hex(), -1)

    def advance(self, key: bytes, server_round: int) -> None:
        """Record ``server_round`` for ``key``, durably, before an input of it is sent.

        Raises:
            ProtocolError: ``server_round`` is not above the recorded round (a replayed
                round, or this node's state was rolled back), or the file cannot be
                read, parsed or written.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                entries = self._read()
                last = entries.pop(key.hex(), -1)
                if server_round <= last:
                    raise ProtocolError(
                        f"input for round {server_round} refused: this node's round ledger "
                        f"({self.path}) records an input for round {last} of this session "
                        "already (replayed round, or the node's state was rolled back)"
                    )
                entries[key.hex()] = server_round  # newest last
                while len(entries) > MAX_ENTRIES:
                    entries.pop(next(iter(entries)))
                self._write({"version": VERSION, "rounds": entries})
        except OSError as err:
            raise ProtocolError(f"the SecAgg+ round ledger {self.path} cannot be written: {err}") from None

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


__all__ = ["MAX_ENTRIES", "RoundLedger"]
