"""The container deployments under ``deploy/`` as :class:`Topology` values, and checks.

The compose files (``deploy/compose``) and the Helm chart (``deploy/k8s/flwr-guard``)
spell out their Flower command lines so that they read on their own; these functions
say what those lines must be — the same :class:`Topology` the local launcher starts,
with container addresses and paths — and list every difference, so a test fails the
moment a file and the description drift apart.

Inside a container the SuperLink binds ``0.0.0.0:8000``; each SuperNode's runtime API
binds ``127.0.0.1:9094`` (only its own SuperExec uses it); TLS material sits in
``/etc/flwr-guard/tls`` and SuperNode keys in ``/etc/flwr-guard/keys``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr_guard import keys
from flwr_guard.deployment.fab_allowlist import IMAGE_ALLOWLIST
from flwr_guard.deployment.topology import NodeConfig, TlsConfig, Topology

SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
TLS_DIR = "/etc/flwr-guard/tls"
KEY_DIR = "/etc/flwr-guard/keys"
# Each SuperNode's SecAgg+ signing key and the federation roster
# (`flwr-guard provision`, flwr_guard.deployment.provision).
SECAGG_DIR = "/etc/flwr-guard/secagg"
COMPOSE_NODES = 3
COMPOSE_CONNECTION = "compose"
K8S_CONNECTION = "k8s"
# The StatefulSet gives each SuperNode pod its ordinal in this variable (downward API,
# label apps.kubernetes.io/pod-index); Kubernetes expands $(POD_INDEX) in args.
POD_INDEX = "$(POD_INDEX)"
# Each SuperNode's record-level DP-SGD ledger (node config dp-sgd-ledger) on its own
# persistent volume (compose: named volume ledger-<i>; Helm: a PVC per pod).
LEDGER_DIR = "/var/lib/flwr-guard/dp-sgd-ledger"
ROUND_LEDGER = f"{LEDGER_DIR}/secagg-round-ledger.json"
# The node operator's explicit policy in every container SuperNode's node config
# (docs/privacy.md "Defaults", docs/secagg.md "The colluder bound"), as `flwr-guard demo`
# sets it. Numbers are written as Helm renders them (8, not 8.0).
# - secagg-max-colluders = 0, secagg-min-honest-others = 2: sums of C + 1 + h = 3, i.e.
#   every node of the 3-node demo federation. The roster-derived default
#   C = ceil(0.05 x 3) = 1 needs sums of 4, which 3 nodes never reach. The honest cost:
#   C = 0 means each node trusts that no other member colludes with the server.
# - DP floors at or above the library defaults (stricter): DP-SGD budget cap 8 (default
#   10), DP-SGD noise floor 1 (0.5), user-level noise floor 0.5 (0.5), at most 2 honest
#   contributors assumed for distributed noise (3).
# - The node guard (every container SuperNode runs under `flwr-guard node start`,
#   GUARD_ENTRYPOINT): its FAB allow-list is the file each SuperNode image writes at
#   build time, pinning the FAB hash of the image's reference app, the one `submit`
#   runs (flwr_guard.deployment.fab_allowlist); no update leaves a node unless SecAgg+
#   masks it (guard-require-secagg, explicit although it is the guard's default).
CONTAINER_NODE_POLICY: NodeConfig = {
    keys.NodeConfig.DP_HONEST_CONTRIBUTORS: 2,
    keys.NodeConfig.DP_MIN_NOISE_MULTIPLIER: 0.5,
    keys.NodeConfig.DP_SGD_MAX_EPSILON: 8,
    keys.NodeConfig.DP_SGD_MIN_NOISE_MULTIPLIER: 1,
    keys.NodeConfig.GUARD_FAB_ALLOWLIST: IMAGE_ALLOWLIST,
    keys.NodeConfig.GUARD_REQUIRE_SECAGG: True,
    keys.NodeConfig.SECAGG_MAX_COLLUDERS: 0,
    keys.NodeConfig.SECAGG_MIN_HONEST_OTHERS: 2,
}
# What every container SuperNode runs: dumb-init (PID 1, reaps the guard's per-message
# processes) and the node guard, which starts flower-supernode (its arguments follow:
# Topology.supernode_command without the program name) with --isolation process and the
# guard's SuperExec (flwr_guard.node.launch). Compose: the SuperNodes' `entrypoint`, so an
# override of `command` keeps the guard; Helm: the container's `command`.
GUARD_ENTRYPOINT: tuple[str, ...] = ("dumb-init", "--", "flwr-guard", "node", "start",
                                     "--app-isolation", "user")


def guarded_supernode_argv(topology: Topology, index: int) -> list[str]:
    """The whole argv of container SuperNode ``index``: :data:`GUARD_ENTRYPOINT` followed
    by ``flower-supernode``'s arguments of ``topology.supernode_command(index)``."""
    return [*GUARD_ENTRYPOINT, *topology.supernode_command(index)[1:]]


def container_topology(
    nodes: int,
    superlink_host: str,
    secure: bool = False,
    node_config: NodeConfig | None = None,
    secagg: bool = True,
    roster_admin_key: str | None = None,
    policy: NodeConfig | None = None,
    ledger: bool = True,
) -> Topology:
    """The topology of a container deployment.

    Args:
        nodes: number of SuperNodes.
        superlink_host: DNS name of the SuperLink on the container network.
        secure: TLS (material in ``/etc/flwr-guard/tls``) and SuperNode
            authentication (``/etc/flwr-guard/keys/supernode-<i>``).
        node_config: extra node config of every SuperNode (e.g. ``device="cuda"``).
        secagg: give each SuperNode its SecAgg+ signing key
            (``/etc/flwr-guard/secagg/secagg-<i>.key``) and the federation roster
            (``/etc/flwr-guard/secagg/roster.json``), the files ``flwr-guard provision``
            writes.
        roster_admin_key: the roster administrator's public key (64 hex) every node
            checks the roster's signature with (``None``: not checked).
        policy: the node operator's explicit floors in every SuperNode's node config
            (``None``: :data:`CONTAINER_NODE_POLICY`); ``node_config`` wins on a shared key.
        ledger: node config ``dp-sgd-ledger`` = :data:`LEDGER_DIR` (each SuperNode's
            persistent volume, where its ledger-init step created the ledger).

    The shared node config is sorted by key (Helm ranges over a map in key order).
    """
    shared: NodeConfig = {
        **(CONTAINER_NODE_POLICY if policy is None else policy),
        **({keys.NodeConfig.DP_SGD_LEDGER: LEDGER_DIR} if ledger else {}),
        **(node_config or {}),
    }
    per_node: tuple[NodeConfig, ...] = ()
    if secagg:
        per_node = tuple(
            {
                keys.NodeConfig.SECAGG_SIGNING_KEY: f"{SECAGG_DIR}/secagg-{i}.key",
                keys.NodeConfig.SECAGG_ROSTER: f"{SECAGG_DIR}/roster.json",
                **({keys.NodeConfig.SECAGG_ROSTER_ADMIN_KEY: roster_admin_key} if roster_admin_key else {}),
                # the node's SecAgg+ round ledger (docs/secagg.md "Storage rollback"), on
                # its own persistent volume next to the DP-SGD ledger
                **({keys.NodeConfig.SECAGG_ROUND_LEDGER: ROUND_LEDGER} if ledger else {}),
            }
            for i in range(nodes)
        )
    return Topology(
        nodes=nodes,
        superlink_port=SUPERLINK_PORT,
        supernode_ports=(SUPERNODE_PORT,) * nodes,
        host="0.0.0.0",
        superlink_host=superlink_host,
        supernode_host="127.0.0.1",
        node_config=dict(sorted(shared.items())),
        per_node_config=per_node,
        tls=(
            TlsConfig(f"{TLS_DIR}/ca.crt", f"{TLS_DIR}/server.crt", f"{TLS_DIR}/server.key")
            if secure
            else None
        ),
        supernode_auth_keys=(
            tuple(f"{KEY_DIR}/supernode-{i}" for i in range(nodes)) if secure else ()
        ),
    )


COMPOSE_VARIANTS: dict[str, tuple[str, ...]] = {
    "plain": ("compose.yml",),
    "tls": ("compose.yml", "compose.tls.yml"),
    "gpu": ("compose.yml", "compose.tls.yml", "compose.gpu.yml"),
}


def compose_topology(variant: str) -> Topology:
    """The topology that the compose files of ``variant`` (see COMPOSE_VARIANTS) run.

    Raises:
        ValueError: for an unknown variant.
    """
    if variant not in COMPOSE_VARIANTS:
        raise ValueError(f"unknown compose variant {variant!r}; one of {list(COMPOSE_VARIANTS)}")
    return container_topology(
        COMPOSE_NODES,
        "superlink",
        secure=variant in ("tls", "gpu"),
        node_config={"device": "cuda"} if variant == "gpu" else None,
    )


def register_argv(topology: Topology, connection: str, indices: Iterable[int]) -> list[str]:
    """The registration step's argv: :mod:`flwr_guard.deployment.register` on the keys."""
    return [
        "python",
        "-m",
        "flwr_guard.deployment.register",
        "--connection",
        connection,
        *(topology.supernode_public_key(i) for i in indices),
    ]


def ledger_init_argv(topology: Topology, index: int) -> list[str]:
    """SuperNode ``index``'s ledger step (:mod:`flwr_guard.deployment.ledger_init`): the
    directory and data source its node config names (``dp-sgd-ledger``,
    ``dp-sgd-data-source`` or ``partition-<i>``)."""
    from flwr_guard.dp.node_policy import data_source

    config = {"partition-id": index, **topology.node_config,
              **(topology.per_node_config[index] if index < len(topology.per_node_config) else {})}
    return ["python", "-m", "flwr_guard.deployment.ledger_init",
            "--dir", str(config.get(keys.NodeConfig.DP_SGD_LEDGER, LEDGER_DIR)), "--source", data_source(config)]


def _diff(where: str, actual: Any, expected: list[str]) -> list[str]:
    if actual == expected:
        return []
    return [f"{where}: command is {actual!r}, the topology says {expected!r}"]


def compose_drift(
    config: Mapping[str, Any], topology: Topology, connection: str = COMPOSE_CONNECTION
) -> list[str]:
    """Differences between a resolved compose model and ``topology`` (empty: none).

    Every ``supernode-<i>`` must have the node guard as its entrypoint
    (:data:`GUARD_ENTRYPOINT`) and ``topology.supernode_command(i)``'s arguments (without
    the program name, which the guard runs) as its command.

    Args:
        config: ``docker compose config --format json`` output, parsed.
        topology: what the services must run (:func:`compose_topology`).
        connection: the ``flwr`` connection name the registration step uses.
    """
    services = config.get("services", {})
    problems: list[str] = []
    if "superlink" not in services:
        return ["no service 'superlink'"]
    problems += _diff(
        "superlink", services["superlink"].get("command"), topology.superlink_command()
    )
    names = sorted(name for name in services if re.fullmatch(r"supernode-\d+", name))
    expected_names = [f"supernode-{i}" for i in range(topology.nodes)]
    if sorted(names) != sorted(expected_names):
        problems.append(f"SuperNode services are {names}, the topology has {expected_names}")
    for index in range(topology.nodes):
        name = f"supernode-{index}"
        if name in services:
            entrypoint = services[name].get("entrypoint") or []
            if list(entrypoint) != list(GUARD_ENTRYPOINT):
                problems.append(f"{name}: entrypoint is {entrypoint!r}, not the node guard "
                                f"{list(GUARD_ENTRYPOINT)!r}")
            problems += _diff(
                name, services[name].get("command"), topology.supernode_command(index)[1:]
            )
    if keys.NodeConfig.DP_SGD_LEDGER in topology.node_config:
        problems += _compose_ledger_drift(services, topology)
    if topology.supernode_auth:
        if "register" not in services:
            problems.append("SuperNode authentication without a 'register' service")
        else:
            problems += _diff(
                "register",
                services["register"].get("command"),
                register_argv(topology, connection, range(topology.nodes)),
            )
    elif "register" in services:
        problems.append("a 'register' service, but the topology has no SuperNode auth")
    return problems


def _compose_ledger_drift(services: Mapping[str, Any], topology: Topology) -> list[str]:
    """Each SuperNode ``i`` starts after its one-shot ``ledger-init-<i>`` succeeded, and
    both mount the same named volume, writable, at the node config's ``dp-sgd-ledger``."""
    problems: list[str] = []
    directory = str(topology.node_config[keys.NodeConfig.DP_SGD_LEDGER])
    for index in range(topology.nodes):
        init, node = f"ledger-init-{index}", f"supernode-{index}"
        if init not in services or node not in services:
            problems.append(f"{node}: no '{init}' service (flwr-guard ledger init before DP-SGD)")
            continue
        problems += _diff(init, services[init].get("command"), ledger_init_argv(topology, index))
        condition = services[node].get("depends_on", {}).get(init, {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(f"{node}: does not wait for {init} to complete successfully")
        mounts = {}
        for name in (init, node):
            found = [v for v in services[name].get("volumes", []) if v.get("target") == directory]
            if len(found) != 1 or found[0].get("type") != "volume" or found[0].get("read_only"):
                problems.append(f"{name}: no writable named volume at {directory}")
            else:
                mounts[name] = found[0].get("source")
        if len(mounts) == 2 and mounts[init] != mounts[node]:
            problems.append(f"{node} and {init} mount different volumes at {directory}: {mounts}")
    volumes = [services[f"supernode-{i}"].get("volumes", []) for i in range(topology.nodes)
               if f"supernode-{i}" in services]
    sources = [v.get("source") for vs in volumes for v in vs if v.get("target") == directory]
    if len(set(sources)) != len(sources):
        problems.append(f"SuperNodes share a ledger volume: {sources}")
    return problems


def _containers(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = manifest.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _argv(container: Mapping[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _with_index(argv: list[str], index: int) -> list[str]:
    return [arg.replace(POD_INDEX, str(index)) for arg in argv]


def k8s_drift(
    manifests: Iterable[Mapping[str, Any]], topology: Topology, connection: str = K8S_CONNECTION
) -> list[str]:
    """Differences between rendered Helm manifests and ``topology`` (empty: none).

    The SuperLink Deployment's container ``superlink`` must run
    ``topology.superlink_command()``; the SuperNode StatefulSet must have
    ``topology.nodes`` replicas, and its container ``supernode`` with ``$(POD_INDEX)``
    replaced by ``i`` must run :func:`guarded_supernode_argv` (the node guard, then
    ``topology.supernode_command(i)``'s arguments) for every ``i``; with
    SuperNode authentication its init container ``register`` registers key ``i``.
    """
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for manifest in manifests:
        if manifest:
            by_kind.setdefault(manifest.get("kind", ""), []).append(manifest)
    problems: list[str] = []
    links = [
        c
        for m in by_kind.get("Deployment", [])
        for c in _containers(m)
        if c.get("name") == "superlink"
    ]
    if len(links) != 1:
        problems.append(f"expected one 'superlink' container in a Deployment, found {len(links)}")
    else:
        problems += _diff("superlink", _argv(links[0]), topology.superlink_command())
    sets = by_kind.get("StatefulSet", [])
    if len(sets) != 1:
        return [*problems, f"expected one SuperNode StatefulSet, found {len(sets)}"]
    replicas = sets[0].get("spec", {}).get("replicas")
    if replicas != topology.nodes:
        problems.append(f"StatefulSet has {replicas} replicas, the topology {topology.nodes}")
    containers = {c.get("name"): c for c in _containers(sets[0])}
    if "supernode" not in containers:
        return [*problems, "no 'supernode' container in the StatefulSet"]
    for index in range(topology.nodes):
        problems += _diff(
            f"supernode pod {index}",
            _with_index(_argv(containers["supernode"]), index),
            guarded_supernode_argv(topology, index),
        )
        if keys.NodeConfig.DP_SGD_LEDGER in topology.node_config:
            if "ledger-init" not in containers:
                problems.append("DP-SGD ledger without a 'ledger-init' init container")
            else:
                problems += _diff(
                    f"ledger-init of pod {index}",
                    _with_index(_argv(containers["ledger-init"]), index),
                    ledger_init_argv(topology, index),
                )
        if topology.supernode_auth:
            if "register" not in containers:
                problems.append("SuperNode authentication without a 'register' init container")
                break
            problems += _diff(
                f"register of pod {index}",
                _with_index(_argv(containers["register"]), index),
                register_argv(topology, connection, [index]),
            )
    return problems


# -- command lines against the real CLIs ------------------------------------------------
def _argparse_check(
    parser: argparse.ArgumentParser, program: str, args: Sequence[str]
) -> argparse.Namespace | None:
    """Parse like the program would; ``None`` for ``--help`` (argparse exits 0)."""
    parser.prog = program
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(list(args))
    except SystemExit as err:
        if err.code == 0:
            return None
        message = stderr.getvalue().strip().splitlines()
        raise ValueError(f"{program}: {message[-1] if message else err}") from err


def _config_check(option: str, value: str) -> None:
    """Parse a ``--node-config`` / ``--run-config`` value as Flower does."""
    import click
    from flwr.common.config import parse_config_args

    try:
        parse_config_args([value])
    except click.ClickException as err:
        raise ValueError(f"{option} {value!r}: {err.format_message()}") from err


def _click_check(args: Sequence[str]) -> None:
    import click
    import typer.main
    from flwr.cli.app import app as flwr_app

    command: click.Command = typer.main.get_command(flwr_app)
    name, rest, parent = "flwr", list(args), None
    try:
        while True:
            ctx = command.make_context(name, rest, parent=parent)
            if not isinstance(command, click.Group):
                break
            pending = [*getattr(ctx, "_protected_args", []), *ctx.args]
            sub_name, sub_command, rest = command.resolve_command(ctx, pending)
            if sub_command is None:
                raise click.UsageError(f"no command {pending[:1]}")
            name, command, parent = str(sub_name), sub_command, ctx
    except click.ClickException as err:
        raise ValueError(f"flwr {' '.join(args)}: {err.format_message()}") from err
    for value in ctx.params.get("run_config_overrides") or ():
        _config_check("--run-config", value)


def check_command_line(argv: Sequence[str]) -> None:
    """Parse ``argv`` with the installed CLI of its program, without running it.

    Knows ``flower-superlink``, ``flower-supernode``, ``flower-superexec`` (Flower's own
    argparse parsers), ``flwr-guard node start`` (the node guard: its ``--app-isolation`` level and the
    ``flower-supernode`` argv it starts, with ``--isolation process``; ``dumb-init --``
    in front is skipped),
    ``flwr`` (Flower's Typer app, down to the subcommand, and ``--run-config`` through
    Flower's config parser), and flwr-guard's
    ``python -m flwr_guard.deployment.register`` / ``.healthcheck``. A SuperNode's
    ``--node-config`` goes through Flower's ``parse_config_args`` as the SuperNode does.

    Raises:
        ValueError: with the CLI's own message if it would refuse the arguments, or
            for a program it does not know.
    """
    program, args = argv[0], list(argv[1:])
    if program == "dumb-init" and args[:1] == ["--"] and len(args) > 1:
        check_command_line(args[1:])
        return
    if program == "flwr-guard" and args[:2] == ["node", "start"]:
        from flwr_guard.node.isolation import LEVELS, split_isolation_args
        from flwr_guard.node.launch import guarded_commands

        level, _, supernode_args = split_isolation_args(args[2:])
        if level not in LEVELS:
            raise ValueError(f"flwr-guard node start: --app-isolation {level!r}: choose one of "
                             f"{', '.join(LEVELS)}")
        supernode, _ = guarded_commands(supernode_args, "/run/flwr-guard/superexec-auth-secret")
        check_command_line(supernode)
        return
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        _argparse_check(_parse_args_run_superlink(), program, args)
    elif program == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        parsed = _argparse_check(_parse_args_run_supernode(), program, args)
        if parsed is not None and parsed.node_config:
            _config_check("--node-config", parsed.node_config)
    elif program == "flower-superexec":
        from flwr.supercore.cli.flower_superexec import _parse_args

        _argparse_check(_parse_args(), program, args)
    elif program == "flwr":
        _click_check(args)
    elif program == "python" and args[:2] == ["-m", "flwr_guard.deployment.register"]:
        from flwr_guard.deployment.register import build_parser

        _argparse_check(build_parser(), "python -m flwr_guard.deployment.register", args[2:])
    elif program == "python" and args[:2] == ["-m", "flwr_guard.deployment.submit"]:
        from flwr_guard.deployment.submit import build_parser as submit_parser

        parsed = _argparse_check(submit_parser(), "python -m flwr_guard.deployment.submit", args[2:])
        if parsed is not None:
            for entry in parsed.run_config:
                _config_check("--run-config", entry)
    elif program == "python" and args[:2] == ["-m", "flwr_guard.deployment.ledger_init"]:
        from flwr_guard.deployment.ledger_init import build_parser as ledger_parser

        _argparse_check(ledger_parser(), "python -m flwr_guard.deployment.ledger_init", args[2:])
    elif program == "python" and args == ["-m", "flwr_guard.deployment.healthcheck"]:
        return
    else:
        raise ValueError(f"no parser known for {list(argv)!r}")
