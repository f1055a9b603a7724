"""The model update, ``local - global``, in one place (NumPy only, no Flower imports).

Every protection that looks at what a client sends (update clipping, SecAgg+'s
quantisation, the leakage audit's norm check, telemetry's update norm) computes it
here, with the same checks: the same array names in the same order, the same shapes,
floating-point values, no NaN or Inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def model_update(local: Arrays, global_: Arrays) -> dict[str, np.ndarray]:
    """``local - global`` per named array, float64, shapes kept.

    Args:
        local: the client's trained arrays (name -> array).
        global_: the global model the round sent (name -> array).

    Raises:
        ValueError: names (or their order) or shapes differ, an array is not
            floating-point, or a value is NaN/Inf.
    """
    if list(local) != list(global_):
        raise ValueError(f"reply arrays {list(local)} do not match the model's {list(global_)}")
    update: dict[str, np.ndarray] = {}
    for name, array in local.items():
        array, reference = np.asarray(array), np.asarray(global_[name])
        if array.shape != reference.shape:
            raise ValueError(f"array {name!r} has shape {array.shape}, model has {reference.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"array {name!r} is {array.dtype}: an update needs floating point")
        diff = array.astype(np.float64) - reference.astype(np.float64)
        if not np.isfinite(diff).all():
            raise ValueError(f"the update of {name!r} holds non-finite values (NaN or Inf)")
        update[name] = diff
    return update


def update_norm(update: Arrays) -> float:
    """L2 norm of the whole update (all arrays as one vector)."""
    return math.sqrt(sum(float(np.vdot(u, u)) for u in update.values()))
