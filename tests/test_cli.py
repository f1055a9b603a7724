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
