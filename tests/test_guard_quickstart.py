"""docs/quickstart.md, as a test: Flower's quickstart app protected by the façades.

``tests/fixtures/quickstart/plain`` is Flower 1.41's quickstart-pytorch template (digits
in place of CIFAR-10); ``protected`` is the same app with the lines docs/quickstart.md
adds. The protected app runs in a real Ray simulation and each protection is shown in
force from the ServerApp's own log.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
from conftest import FIXTURES, alive

from flwr_guard.demo import DemoOptions, run_demo

QUICKSTART = FIXTURES / "quickstart"
CLIENT_FILES = ("quickstart/client_app.py", "quickstart/task.py")
SERVER_FILES = ("quickstart/server_app.py",)
DOC = Path(__file__).parent.parent / "docs" / "quickstart.md"


def _added(files: tuple[str, ...]) -> list[str]:
    added = []
    for name in files:
        plain = (QUICKSTART / "plain" / name).read_text().splitlines()
        protected = (QUICKSTART / "protected" / name).read_text().splitlines()
        added += [line[1:] for line in difflib.unified_diff(plain, protected, lineterm="", n=0)
                  if line.startswith("+") and not line.startswith("+++")]
    return added


def test_the_protected_quickstart_adds_at_most_12_lines_per_side_and_docs_show_them() -> None:
    client, server = _added(CLIENT_FILES), _added(SERVER_FILES)
    assert 0 < len(client) <= 12 and 0 < len(server) <= 12, (client, server)
    assert (QUICKSTART / "plain/quickstart/task.py").read_text() == (
        QUICKSTART / "protected/quickstart/task.py").read_text()
    doc = DOC.read_text()
    for line in client + server:  # the doc shows exactly what the fixture adds
        assert line.strip() in doc, line


@pytest.mark.simulation
def test_the_protected_quickstart_runs_with_secagg_and_dpsgd_in_force(tmp_path) -> None:
    nodes, rounds = 3, 2
    result = run_demo(DemoOptions(nodes=nodes, rounds=rounds, simulation=True,
                                  app_dir=QUICKSTART / "protected", workdir=tmp_path))
    assert result.success, result.error
    assert alive(result.processes) == []
    log = (tmp_path / "serverapp.log").read_text()
    # The manifest's lines at start, and what protected each round.
    assert "flwr-guard protections (sent to every client as the protection manifest)" in log
    assert "SecAgg+: num_shares=auto" in log
    for rnd in range(1, rounds + 1):
        assert f"flwr-guard round {rnd}: SecAgg+ summed {nodes} of {nodes} sampled clients" in log
    # DP-SGD ran on every client (the policy refuses an update trained without it) and
    # its record-level epsilon reached the server (mean over the clients under SecAgg+).
    # (Flower logs each round's aggregate, then all of them again in its final results.)
    epsilons = sorted({float(e) for e in re.findall(r"'dp-sgd-epsilon': ([0-9.e+-]+)", log)})
    assert len(epsilons) == rounds and 0 < epsilons[0] < epsilons[1]
    assert "refused" not in log
