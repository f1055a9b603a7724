"""One description of a Flower deployment and the command lines that start it.

The local launcher (``flwr-guard demo``, :class:`~flwr_guard.deployment.LocalDeployment`)
starts exactly these commands; the compose files and the Helm chart under ``deploy/``
are checked against the same description (``flwr_guard.deployment.manifests``) so that
they cannot drift apart.

TLS and SuperNode authentication follow Flower 1.41: the SuperLink serves its Fleet,
Control and Runtime APIs over HTTPS on one port (``--ssl-ca-certfile``,
``--ssl-certfile``, ``--ssl-keyfile``), SuperNodes and the ``flwr`` CLI verify it with
the CA certificate (``--root-certificates``, ``root-certificates`` in the connection),
and with ``--enable-supernode-auth`` the SuperLink only accepts SuperNodes whose EC
public key was registered with ``flwr supernode register KEY.pub CONNECTION``; each
SuperNode signs with its OpenSSH-format EC private key
(``--auth-supernode-private-key``; Flower derives the public key from it and warns that
``--auth-supernode-public-key`` is deprecated, so it is not passed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from flwr_guard.deployment.ports import free_port

NodeConfig = dict[str, str | int | float]


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the SuperLink's TLS material, as the processes see them.

    Attributes:
        ca_certfile: PEM CA certificate that signed ``certfile``; SuperNodes, the
            SuperLink's own SuperExec and the ``flwr`` CLI verify the SuperLink with it.
        certfile: PEM server certificate of the SuperLink; its SANs must name every
            address clients dial (and ``127.0.0.1``: the SuperExec that the SuperLink
            starts dials ``127.0.0.1`` when the SuperLink binds ``0.0.0.0``).
        keyfile: PEM private key of ``certfile``.
    """

    ca_certfile: str
    certfile: str
    keyfile: str


@dataclass(frozen=True)
class Topology:
    """A SuperLink and ``nodes`` SuperNodes (or a simulation SuperLink).

    Attributes:
        nodes: number of SuperNodes (in simulation: of simulated nodes), >= 1.
        superlink_port: the SuperLink's HTTP(S) port (Fleet, Control and Runtime APIs).
        supernode_ports: each SuperNode's own runtime (ClientAppIo) port.
        host: address the SuperLink binds to (and, unless ``supernode_host`` is set,
            the SuperNodes' runtime APIs).
        simulation: run Flower's simulation runtime instead of SuperNodes.
        node_config: extra ``--node-config`` entries given to every SuperNode.
        superlink_host: address SuperNodes and the ``flwr`` CLI dial for the SuperLink
            (a DNS name in compose or Kubernetes); ``None``: ``host``.
        supernode_host: address each SuperNode's runtime API binds to; ``None``:
            ``host``. Its own SuperExec dials it, so loopback is enough and keeps the
            unauthenticated runtime API off the network.
        tls: the SuperLink's TLS material; ``None``: ``--insecure`` (loopback only).
        per_node_config: extra ``--node-config`` entries of each SuperNode (one mapping
            per node, e.g. its SecAgg+ signing-key file); empty: none.
        supernode_auth_keys: OpenSSH EC private key of each SuperNode; non-empty turns
            on SuperNode authentication (needs ``tls``). Public keys sit next to them
            with a ``.pub`` suffix (``ssh-keygen``'s convention).

    Raises:
        ValueError: from the constructor, if the numbers of nodes, ports and keys
            disagree or authentication is asked for without TLS.
    """

    nodes: int
    superlink_port: int
    supernode_ports: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    simulation: bool = False
    node_config: NodeConfig = field(default_factory=dict)
    superlink_host: str | None = None
    supernode_host: str | None = None
    tls: TlsConfig | None = None
    supernode_auth_keys: tuple[str, ...] = ()
    per_node_config: tuple[NodeConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a deployment needs at least one node, got {self.nodes}")
        if not self.simulation and len(self.supernode_ports) != self.nodes:
            raise ValueError(
                f"{self.nodes} SuperNodes need {self.nodes} ports, got {len(self.supernode_ports)}"
            )
        if self.supernode_auth_keys:
            if self.tls is None:
                raise ValueError(
                    "SuperNode authentication needs TLS: Flower refuses "
                    "--enable-supernode-auth together with --insecure"
                )
            if self.simulation or len(self.supernode_auth_keys) != self.nodes:
                raise ValueError(
                    f"{self.nodes} SuperNodes need {self.nodes} private keys, "
                    f"got {len(self.supernode_auth_keys)}"
                )

    @classmethod
    def on_free_ports(
        cls,
        nodes: int,
        superlink_port: int = 0,
        simulation: bool = False,
        node_config: NodeConfig | None = None,
        host: str = "127.0.0.1",
        tls: TlsConfig | None = None,
        supernode_auth_keys: tuple[str, ...] = (),
        per_node_config: tuple[NodeConfig, ...] = (),
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
            tls=tls,
            supernode_auth_keys=tuple(supernode_auth_keys),
            per_node_config=tuple(per_node_config),
        )

    # -- addresses -------------------------------------------------------------------
    @property
    def superlink_address(self) -> str:
        """``HOST:PORT`` that SuperNodes and the ``flwr`` CLI dial."""
        return f"{self.superlink_host or self.host}:{self.superlink_port}"

    @property
    def supernode_auth(self) -> bool:
        return bool(self.supernode_auth_keys)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def health_url(self) -> str:
        """The SuperLink's health endpoint (HTTP 200 when it serves)."""
        return f"{self.scheme}://{self.superlink_address}/health"

    # -- command lines ---------------------------------------------------------------
    def superlink_command(self) -> list[str]:
        """``flower-superlink`` argv (run-time dependency installation off)."""
        argv = ["flower-superlink", *self._superlink_tls_args()]
        if self.supernode_auth:
            argv.append("--enable-supernode-auth")
        argv += [
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
        entries: NodeConfig = {
            "partition-id": index,
            "num-partitions": self.nodes,
            **self.node_config,
            **(self.per_node_config[index] if index < len(self.per_node_config) else {}),
        }
        def toml(value: object) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            return f'"{value}"' if isinstance(value, str) else str(value)

        return " ".join(f"{key}={toml(value)}" for key, value in entries.items())

    def supernode_command(self, index: int) -> list[str]:
        """``flower-supernode`` argv of SuperNode ``index`` (0-based)."""
        if self.simulation:
            raise ValueError("a simulation topology has no SuperNode processes")
        argv = ["flower-supernode", *self._supernode_tls_args()]
        if self.supernode_auth:
            argv += ["--auth-supernode-private-key", self.supernode_auth_keys[index]]
        return argv + [
            "--superlink",
            self.superlink_address,
            "--host",
            self.supernode_host or self.host,
            "--port",
            str(self.supernode_ports[index]),
            "--node-config",
            self.supernode_node_config(index),
        ]

    def supernode_public_key(self, index: int) -> str:
        """Path of SuperNode ``index``'s public key (its private key's path + ``.pub``)."""
        if not self.supernode_auth:
            raise ValueError("this topology has no SuperNode authentication")
        return f"{self.supernode_auth_keys[index]}.pub"

    def flwr_config_toml(self, connection: str) -> str:
        """``$FLWR_HOME/config.toml`` with ``connection`` (the default) to the SuperLink.

        Raises:
            ValueError: if the CA path is relative (the ``flwr`` CLI needs it absolute).
        """
        lines = [
            "[superlink]",
            f"default = {json.dumps(connection)}",
            "",
            f"[superlink.{connection}]",
            f"address = {json.dumps(self.superlink_address)}",
        ]
        if self.tls is None:
            lines.append("insecure = true")
        else:
            if not self.tls.ca_certfile.startswith("/"):
                raise ValueError(
                    f"root-certificates must be an absolute path, got {self.tls.ca_certfile!r}"
                )
            lines.append(f"root-certificates = {json.dumps(self.tls.ca_certfile)}")
        return "\n".join(lines) + "\n"

    def _superlink_tls_args(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            self.tls.ca_certfile,
            "--ssl-certfile",
            self.tls.certfile,
            "--ssl-keyfile",
            self.tls.keyfile,
        ]

    def _supernode_tls_args(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return ["--root-certificates", self.tls.ca_certfile]
