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
    """``local - global`` flattened to float64, shape ``(num_values,)``.

    Raises:
        ValueError: if the names or shapes differ, or a value is NaN/Inf.
    """
    if list(local) != list(global_):
        raise ValueError(
            f"reply arrays {list(local)} do not match the model's {list(global_)}"
        )
    pieces = []
    for name, array in local.items():
        array = np.asarray(array)
        reference = np.asarray(global_[name])
        if array.shape != reference.shape:
            raise ValueError(f"array {name!r} has shape {array.shape}, model has {reference.shape}")
        pieces.append((array.astype(np.float64) - reference.astype(np.float64)).ravel())
    flat = np.concatenate(pieces) if pieces else np.zeros(0)
    if not np.isfinite(flat).all():
        raise ValueError("update holds NaN or Inf")
    return flat


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
