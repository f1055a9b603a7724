"""The leakage-audit mod, its gate and the server-side reply guard in a real Flower
simulation (Ray): scores arrive at the server, a leaking update is blocked and the
rounds go on, a reply with per-example losses is dropped before FedAvg."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, alive

from flwr_guard.audit.audit_mod import BLOCKED_REASON
from flwr_guard.demo import DemoOptions, run_demo

pytestmark = pytest.mark.simulation


def test_audit_in_simulation(tmp_path) -> None:
    result_file = tmp_path / "result.json"
    result = run_demo(DemoOptions(
        nodes=3, rounds=2, simulation=True, app_dir=FIXTURES / "audit_app",
        run_config={"result-file": str(result_file)},
    ))
    assert result.success, result.error
    assert alive(result.processes) == []
    out = json.loads(result_file.read_text())
    assert sorted(out["replies"]) == ["1", "2"]  # both rounds ran
    for rnd in ("1", "2"):
        replies = out["replies"][rnd]
        errors = [r["error"] for r in replies if "error" in r]
        audited = [r for r in replies if "error" not in r]
        # Partition 0's unprotected update: blocked by the gate, with the reason.
        assert len(errors) == 1 and errors[0].startswith(BLOCKED_REASON)
        assert "identified" in errors[0] or "above the mean-image" in errors[0]
        # The two others carry their audit scores (scores only, no lists of them).
        assert len(audited) == 2
        assert all(r["audit-ran"] == 1 and r["audit-leaks"] == 0 for r in audited)
        assert {r["audit-psnr-db"] > 0 for r in audited} == {True}
        assert sorted(r["list-keys"] for r in audited) == [[], ["per-example-loss"]]
        # The server's summary: 1 audit left after the guard, 1 gate block, no leak.
        summary = out["summary"][rnd]
        assert summary["audit-blocked"] == 1 and summary["audit-leaks"] == 0
        assert out["blocked-by-guard"][rnd] == 1
        assert "per-example-metric" in out["guard-findings"][rnd]
        assert out["train-metrics"][rnd]["audit-ran"] == summary["audit-ran"] == 2
    assert out["final-checksum"] != out["initial-checksum"]  # the model moved on
    assert out["worst"]["audit-leaks"] == 0
