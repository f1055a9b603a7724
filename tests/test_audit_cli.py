"""`flwr-guard audit`: a small sweep writes JSON, Markdown and a PNG grid whose
numbers say what the attacks found."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flwr_guard.cli import app


def test_audit_command_writes_the_report(tmp_path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "audit", "--out", str(out), "--models", "lenet", "--sizes", "8",
        "--defences", "none,dp-1", "--batch-sizes", "1", "--audits", "1",
        "--effort", "0.2", "--attacks", "idlg,ig-prior", "--budget", "0", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "audit.json").read_text())
    cells = {c["cell"]: c for c in data["cells"]}
    assert set(cells) == {"lenet/8px/none/B1", "lenet/8px/dp-1/B1"}
    assert cells["lenet/8px/none/B1"]["leaks"] is True
    assert cells["lenet/8px/none/B1"]["worst"]["identified-rate"] == 1.0
    assert cells["lenet/8px/dp-1/B1"]["leaks"] is False
    assert "images" not in json.dumps(data)  # scores only
    table = (out / "audit.md").read_text()
    assert table.count("\n| lenet | 8x8 |") == 2 and "**leaks**" in table
    png = (out / "audit_grid_b1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_audit_command_rejects_unknown_names(tmp_path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["audit", "--out", str(tmp_path), "--defences", "tls"])
    assert bad.exit_code == 2 and "unknown defence" in bad.output
    bad = runner.invoke(app, ["audit", "--out", str(tmp_path), "--attacks", "magic"])
    assert bad.exit_code == 2 and "unknown attack" in bad.output
