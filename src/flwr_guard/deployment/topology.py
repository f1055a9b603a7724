"""One description of a Flower deployment and the command lines that start it.

The local launcher (``flwr-guard demo``) starts exactly these commands; deployment
files (compose, Kubernetes) are to be generated from or checked against the same
description so that they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr_guard.deployment.ports import free_port


@dataclass(frozen=True)
class Topology:
    """A SuperLink and ``nodes`` SuperNodes (or a simulation SuperLink).

    Attributes:
        nodes: number of SuperNodes (in simulation: of simulated nodes), >= 1.
        superlink_port: the SuperLink's HTTP port (Fleet, Control and Runtime APIs).
        supernode_ports: each SuperNode's own runtime (ClientAppIo) port.
        host: address every process binds to.
        simulation: run Flower's simulation runtime instead of SuperNodes.
        node_config: extra ``--node-config`` entries given to every SuperNode.
    """

    nodes: int
    superlink_port: int
    supernode_ports: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    simulation: bool = False
    node_config: dict[str, str | int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a deployment needs at least one node, got {self.nodes}")
        if not self.simulation and len(self.supernode_ports) != self.nodes:
            raise ValueError(
                f"{self.nodes} SuperNodes need {self.nodes} ports, got {len(self.supernode_ports)}"
            )

    @classmethod
    def on_free_ports(
        cls,
        nodes: int,
        superlink_port: int = 0,
        simulation: bool = False,
        node_config: dict[str, str | int | float] | None = None,
        host: str = "127.0.0.1",
    ) -> Topology:
        """Build a topology whose unset ports (0) are free ports chosen by the kernel."""
        ports = tuple(free_port(host) for _ in range(0 if simulation else nodes))
        return cls(
            nodes=nodes,
            superlink_port=superlink_port or free_port(host),
            supernode_ports=ports,
            host=host,
            simulation=simulation,
            node_config=dict(node_config or {}),
        )

    @property
    def superlink_address(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    def superlink_command(self) -> list[str]:
        """``flower-superlink`` argv (run-time dependency installation off)."""
        argv = [
            "flower-superlink",
            "--insecure",
            "--host",
            self.host,
            "--port",
            str(self.superlink_port),
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            argv.append("--simulation")
        return argv

    def supernode_node_config(self, index: int) -> str:
        """The ``--node-config`` value of SuperNode ``index``: its data partition first."""
        entries: dict[str, str | int | float] = {
            "partition-id": index,
            "num-partitions": self.nodes,
            **self.node_config,
        }
        return " ".join(
            f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}"
            for key, value in entries.items()
        )

    def supernode_command(self, index: int) -> list[str]:
        """``flower-supernode`` argv of SuperNode ``index`` (0-based)."""
        if self.simulation:
            raise ValueError("a simulation topology has no SuperNode processes")
        return [
            "flower-supernode",
            "--insecure",
            "--superlink",
            self.superlink_address,
            "--host",
            self.host,
            "--port",
            str(self.supernode_ports[index]),
            "--node-config",
            self.supernode_node_config(index),
        ]
