"""flwr_guard.update: the one local - global of every protection."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_guard.update import model_update, update_norm


def test_update_is_local_minus_global_in_float64_with_its_norm() -> None:
    g = {"w": np.ones((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    local = {"w": np.full((2, 3), 4.0, np.float32), "b": np.array([0.0, 4.0], np.float32)}
    update = model_update(local, g)
    assert all(u.dtype == np.float64 for u in update.values())
    np.testing.assert_array_equal(update["w"], np.full((2, 3), 3.0))
    assert update_norm(update) == pytest.approx(np.sqrt(6 * 9 + 16))


@pytest.mark.parametrize(("local", "message"), [
    ({"b": np.zeros(2), "w": np.zeros((2, 3))}, "do not match"),
    ({"w": np.zeros((3, 2)), "b": np.zeros(2)}, "shape"),
    ({"w": np.zeros((2, 3), np.int64), "b": np.zeros(2)}, "floating point"),
    ({"w": np.full((2, 3), np.nan), "b": np.zeros(2)}, "NaN or Inf"),
])
def test_a_malformed_update_is_refused(local, message) -> None:
    with pytest.raises(ValueError, match=message):
        model_update(local, {"w": np.zeros((2, 3)), "b": np.zeros(2)})
