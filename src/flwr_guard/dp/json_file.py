"""One way to write and read the privacy ledgers' JSON files (no Flower imports).

Both the user-level privacy checkpoint (:mod:`flwr_guard.dp.budget`) and the node's
record-level ledger (:mod:`flwr_guard.dp.record_ledger`) must never be left half
written: a crash during a write leaves either the old file or the new one. The write
goes to a temporary file in the same directory, is ``fsync``'ed, replaces the target
with ``os.replace`` (atomic on POSIX within one file system), and the directory is
``fsync``'ed so that the rename survives a power loss (POSIX ``rename(2)``, and
``fsync(2)``: "calling fsync() on a file does not necessarily ensure that the entry in
the directory containing the file has also reached disk").
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomically(path: str | os.PathLike[str], data: Any, *, indent: int | None = None,
                          prefix: str = ".tmp-") -> None:
    """Write ``data`` as JSON to ``path``, atomically (see the module docstring); the parent
    directory is created when missing.

    Raises:
        OSError: the directory or file cannot be written (the target is left as it was and
            no temporary file is left behind).
        TypeError: ``data`` is not JSON-serialisable (same guarantees).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=prefix, suffix=".tmp",
                                     delete=False, encoding="utf-8") as tmp:
        try:
            json.dump(data, tmp, indent=indent)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    try:
        os.replace(tmp.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError:  # some file systems refuse fsync on a directory; the rename stands
        pass
    finally:
        os.close(directory)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value stored at ``path``.

    Raises:
        OSError: the file cannot be read.
        json.JSONDecodeError: it is not JSON (a ``ValueError``).
        UnicodeDecodeError: it is not UTF-8 (a ``ValueError``).
    """
    return json.loads(Path(path).read_text(encoding="utf-8"))
