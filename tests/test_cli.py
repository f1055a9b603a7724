"""Bad input to `flwr-guard demo` gets a clear error and starts nothing."""

from __future__ import annotations

import socket

import psutil
import pytest
from typer.testing import CliRunner

from flwr_guard.cli import app
from flwr_guard.deployment import Topology

runner = CliRunner()


def _no_children() -> bool:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--nodes", "0"], "0 is not in the range x>=1"),
        (["demo", "--rounds", "-1"], "x>=1"),
        (["demo", "--bogus"], "--bogus"),
        (["demo", "--partition", "shards"], "'shards' is not one of"),
        (["demo", "--alpha", "0"], "--alpha must be > 0"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert _no_children()


def test_port_in_use_is_refused_before_anything_starts(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(
            app, ["demo", "--port", str(port), "--summary", str(tmp_path / "s.json")]
        )
    assert result.exit_code == 2, result.output
    assert f"127.0.0.1:{port} is already in use" in " ".join(result.output.split())
    assert not (tmp_path / "s.json").exists()
    assert _no_children()


def test_topology_commands() -> None:
    topo = Topology.on_free_ports(nodes=3, node_config={"device": "cpu"})
    superlink = topo.superlink_command()
    assert "--disable-runtime-dependency-installation" in superlink
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"
    ports = {topo.superlink_port, *topo.supernode_ports}
    assert len(ports) == 4
    node = topo.supernode_command(2)
    assert node[node.index("--superlink") + 1] == topo.superlink_address
    assert node[node.index("--node-config") + 1] == (
        'partition-id=2 num-partitions=3 device="cpu"'
    )
    with pytest.raises(ValueError, match="at least one node"):
        Topology.on_free_ports(nodes=0)


def test_demo_prints_one_plain_line_per_round_when_not_a_terminal(capsys) -> None:
    from flwr_guard.cli import _PlainProgress
    from flwr_guard.demo import DemoState

    progress, state = _PlainProgress(rounds=2), DemoState(phase="running", run_id="7")
    progress(state)
    state.rounds.append({"round": 1, "train": {"train-loss": 0.5, "dp-sgd-epsilon": 1.25},
                         "server": {"test-accuracy": 0.75}, "privacy": {"dp-sgd-max-epsilon": 8},
                         "secagg": {"survivors": 3, "cohort": 4}, "elapsed-s": 12.0})
    progress(state)
    progress(state)  # nothing new: nothing printed
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "demo: running (run 7, 0 s)"
    assert len(lines) == 2 and "round 1/2" in lines[1] and "test acc. 0.750" in lines[1]
    assert "ε record / budget 1.25 / 8.0" in lines[1] and "SecAgg+ survivors 3/4" in lines[1]


def test_undeclared_run_config_keys_are_named(tmp_path) -> None:
    from flwr_guard.deployment.local import _undeclared_hint

    (tmp_path / "pyproject.toml").write_text('[tool.flwr.app.config]\nlr = 0.1\n')
    hint = _undeclared_hint(tmp_path, {"lr": 0.2, "metrics-port": 9464})
    assert "metrics-port" in hint and "lr" not in hint.split(":")[-1]
