"""The ledgers' one JSON writer: a failed write leaves the old file and no temporary."""

from __future__ import annotations

import pytest

from flwr_guard.dp.json_file import read_json, write_json_atomically


def test_write_then_read_round_trips_and_creates_the_directory(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "ledger.json"
    write_json_atomically(path, {"history": [[1.1, 0.01, 3]]}, indent=1)
    assert read_json(path) == {"history": [[1.1, 0.01, 3]]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]


def test_a_failed_write_keeps_the_previous_ledger_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    write_json_atomically(path, {"epsilon-spent": 2.5})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomically(path, {"epsilon-spent": object()})
    assert read_json(path) == {"epsilon-spent": 2.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
