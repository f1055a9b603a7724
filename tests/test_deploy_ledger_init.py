"""The containers' ledger step (flwr_guard.deployment.ledger_init): created once, never reset.

compose runs it before each SuperNode on every `up` (service ledger-init-<i>), Helm as the
init container of every pod start, on the node's persistent volume; so a second run must
keep a spent budget, and an unreadable ledger must stop the node rather than be replaced.
"""

from __future__ import annotations

import subprocess
import sys

from flwr_guard.deployment.ledger_init import ensure_ledger, main
from flwr_guard.dp.record_ledger import RecordLedger, init_ledger, ledger_path


def _spend(directory, source: str) -> bytes:
    ledger = RecordLedger(directory, source)
    ledger.reserve(1.5, 0.1, 24, delta=1e-5, accountant="rdp")
    return ledger_path(directory, source).read_bytes()


def test_a_missing_ledger_is_created_empty(tmp_path) -> None:
    message = ensure_ledger(str(tmp_path / "ledger"), "partition-0")
    path = tmp_path / "ledger" / "partition-0.json"
    assert message == f"created the record-level ledger {path} (data source 'partition-0', epsilon 0)"
    assert RecordLedger(tmp_path / "ledger", "partition-0").steps == 0


def test_a_second_run_keeps_the_spent_budget_byte_for_byte(tmp_path, capsys) -> None:
    ensure_ledger(str(tmp_path), "partition-1")
    spent = _spend(tmp_path, "partition-1")
    assert main(["--dir", str(tmp_path), "--source", "partition-1"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"kept the record-level ledger {tmp_path / 'partition-1.json'} (24 DP-SGD steps recorded)")
    assert ledger_path(tmp_path, "partition-1").read_bytes() == spent
    assert RecordLedger(tmp_path, "partition-1").steps == 24
    # positive control: what a plain re-initialisation would have done to that budget
    init_ledger(tmp_path, "partition-1", force=True)
    assert RecordLedger(tmp_path, "partition-1").steps == 0


def test_an_unreadable_ledger_stops_the_step_and_is_left_as_it_is(tmp_path, capsys) -> None:
    path = ledger_path(tmp_path, "partition-2")
    path.write_text("{not json")
    assert main(["--dir", str(tmp_path), "--source", "partition-2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ledger-init: cannot read the record-level ledger {path}")
    assert path.read_text() == "{not json"
    # another source's file under this name is refused the same way
    other = tmp_path / "other"
    ensure_ledger(str(other), "partition-3")
    ledger_path(other, "partition-3").rename(ledger_path(other, "partition-4"))
    assert main(["--dir", str(other), "--source", "partition-4"]) == 1
    assert "belongs to data source 'partition-3', not 'partition-4'" in capsys.readouterr().err


def test_an_invalid_source_is_refused_naming_the_node_config_key(tmp_path, capsys) -> None:
    assert main(["--dir", str(tmp_path), "--source", "../escape"]) == 1
    assert "node config dp-sgd-data-source must be" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_module_runs_as_the_containers_run_it(tmp_path) -> None:
    argv = [sys.executable, "-m", "flwr_guard.deployment.ledger_init",
            "--dir", str(tmp_path), "--source", "partition-0"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert first.stdout.startswith("created the record-level ledger")
    assert second.stdout.startswith("kept the record-level ledger")
