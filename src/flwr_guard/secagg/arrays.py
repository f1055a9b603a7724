"""Flattening of named model arrays and the model hash (NumPy only).

The update SecAgg+ masks is one flat float vector: the concatenation, in key order,
of each array of ``local - global``. The model hash binds a round to the exact global
model: SHA-256 over every array's name, dtype, shape and bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

from flwr_guard.secagg.crypto import transcript
from flwr_guard.update import model_update

Arrays = Mapping[str, np.ndarray]


def model_hash(arrays: Arrays) -> bytes:
    """SHA-256 transcript of the named arrays (order-sensitive, byte-exact)."""
    parts: list[bytes] = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        parts += [
            name.encode(),
            array.dtype.str.encode(),
            struct.pack(f">{array.ndim}Q", *array.shape),
            array.tobytes(),
        ]
    return transcript(b"model", *parts)


def num_values(arrays: Arrays) -> int:
    """Total number of scalars."""
    return int(sum(np.asarray(a).size for a in arrays.values()))


def flat_update(local: Arrays, global_: Arrays) -> np.ndarray:
    """``local - global`` flattened to float64, shape ``(num_values,)``, in key order
    (:func:`flwr_guard.update.model_update`, flattened).

    Raises:
        ValueError: if the names or shapes differ, an array is not floating point, or a
            value is NaN/Inf.
    """
    pieces = [diff.ravel() for diff in model_update(local, global_).values()]
    return np.concatenate(pieces) if pieces else np.zeros(0)


def apply_flat_update(global_: Arrays, update: np.ndarray) -> dict[str, np.ndarray]:
    """``global + update`` with each array's shape and dtype.

    Raises:
        ValueError: if ``update`` has the wrong length.
    """
    if update.shape != (num_values(global_),):
        raise ValueError(f"update of length {update.shape}, model has {num_values(global_)} values")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, array in global_.items():
        array = np.asarray(array)
        piece = update[offset : offset + array.size].reshape(array.shape)
        out[name] = (array.astype(np.float64) + piece).astype(array.dtype)
        offset += array.size
    return out
