"""`flwr-guard demo`: the reference app on a real local Flower deployment, end to end.

Starts a SuperLink and N SuperNodes on 127.0.0.1 (or a simulation SuperLink), submits
the digits app with ``flwr run``, follows its progress and its real status, and stops
every process it started whatever happens (success, failure, Ctrl-C, SIGTERM).

The launcher never hangs and never lies (docs/demo.md, "Lost nodes, waits and status"):

- the run goes on while at least ``min-nodes`` SuperNodes are left; by default that is
  the cohort minus the losses SecAgg+ tolerates in a round (k - t of the cohort's
  parameters, never below the nodes' smallest cohort). Fewer left (and none coming
  back): the launcher stops the run and says why, instead of leaving Flower waiting
  for nodes that will not come;
- every wait is bounded and named: SuperNodes connecting (start-up timeout), a
  restarted SuperNode connecting (the same), the run itself (``timeout_s``);
- the run's status is read from the SuperLink until it has finished; a slow or failed
  ``flwr ls`` is retried with backoff (:mod:`flwr_guard.deployment.status`) up to a
  deadline tied to ``timeout_s``; past it the summary says the status is unknown;
- Ctrl-C and SIGTERM stop every process by PID and still write the summary.

Every protection is on: the node operator's guard around the app (``node_guard``, on by
default in a deployment: each SuperNode runs the app it receives under its own policy,
with the demo's app pinned on its allow-list, docs/deploy.md "The node guard"), SecAgg+,
DP-SGD with a record-level budget, the leakage audit and reply inspection; the ServerApp
exports Prometheus metrics and, when the ``prometheus`` binary is installed
(``make tools``), a local Prometheus scrapes them.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr_guard.apps.digits import app_dir as digits_app_dir
from flwr_guard.deployment import DeploymentError, LocalDeployment, Topology, ensure_port_free
from flwr_guard.deployment.local import (
    NODE_UNAVAILABLE_AFTER_S,
    SUPEREXEC_POLL_INTERVAL_S,
)
from flwr_guard.deployment.status import UNKNOWN, StatusPolicy, StatusTracker, StatusUnknown
from flwr_guard.keys import NodeConfig, ReplyMetrics, RunConfig
from flwr_guard.secagg.keys import write_federation
from flwr_guard.telemetry.exporter import preferred_port
from flwr_guard.telemetry.prometheus_server import (
    PrometheusError,
    local_prometheus_if_installed,
)

COMPLETED = "finished:completed"
# After the launcher asks the SuperLink to stop a run (its nodes are gone, its time is
# up, a process died), how long it keeps reading the status for the run's real end.
STOP_GRACE_S = 120.0
# After the ServerApp reported its end, how long the status may take to say "finished".
FINISHED_GRACE_S = 600.0

logger = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    """What ``flwr-guard demo`` runs; see the CLI's ``--help`` for each option."""

    nodes: int = 4
    rounds: int = 5
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 42
    simulation: bool = False
    superlink_port: int = 0
    app_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    node_config: dict[str, str | int | float] = field(default_factory=dict)
    workdir: Path | None = None
    keep_workdir: bool = False
    # Scrape the ServerApp's metrics with a local Prometheus when it is installed.
    prometheus: bool = True
    # `flwr ls` costs ~2 s of CPU: ask for the status rarely while rounds are coming,
    # often once the ServerApp says it has finished.
    status_interval_s: float = 10.0
    status_interval_finishing_s: float = 1.0
    # A SuperNode that exits is reported and the run goes on with the others (SecAgg+
    # counts it as a dropout); False: end the demo with an error naming it.
    tolerate_node_loss: bool = True
    # Start a lost SuperNode again at once (an operator's restart policy); it comes back
    # under a new Flower node id and joins the first round sampled after it connects.
    restart_lost_nodes: bool = False
    # Nodes that must be connected before a round starts (the app's `min-nodes`); None:
    # the nodes minus the losses SecAgg+ tolerates (default_min_nodes). The run goes on
    # while at least this many SuperNodes are left (or restarted and connecting); with
    # fewer, the launcher stops it with a message (Flower would wait for them forever).
    min_nodes: int | None = None
    # Restarts of one SuperNode (with restart_lost_nodes) before it counts as lost.
    max_restarts_per_node: int = 3
    # Seconds to wait for the SuperLink, and for the SuperNodes to connect (at start, and
    # for a restarted one).
    startup_timeout_s: float = 180.0
    # Where run_demo writes the JSON summary itself (also when interrupted); None: only
    # returned.
    summary_path: Path | None = None
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL of every SuperExec (None: Flower's 1 s).
    superexec_poll_interval_s: float | None = SUPEREXEC_POLL_INTERVAL_S
    timeout_s: float = 3600.0
    # Run every SuperNode under the node operator's guard (flwr_guard.node: the app in a
    # child process, the node's policy mods outermost, the demo's app pinned on the
    # allow-list); False: plain SuperNodes, the app's own ClientGuard only. Deployment only.
    node_guard: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for options that cannot work."""
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {self.nodes}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        if self.partition not in ("iid", "dirichlet"):
            raise ValueError(f"--partition must be 'iid' or 'dirichlet', got {self.partition!r}")
        if self.alpha <= 0:
            raise ValueError(f"--alpha must be > 0, got {self.alpha}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ValueError(
                f"--min-nodes must be between 1 and --nodes ({self.nodes}), got {self.min_nodes}"
            )
        if not self.timeout_s > 0 or not self.startup_timeout_s > 0:
            raise ValueError("timeout_s and startup_timeout_s must be > 0")
        for module, extra, needed in (("ray", "simulation", self.simulation),
                                      ("flwr_datasets", "data", self.partition == "dirichlet")):
            if needed and not _installed(module):
                raise ValueError(f"{'--simulation' if extra == 'simulation' else '--partition dirichlet'} "
                                 f"needs {module!r}, which is not installed: "
                                 f'pip install "flwr-guard[{extra}]"')


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@dataclass
class DemoState:
    """What the demo knows while the run goes on (passed to the progress callback)."""

    phase: str = "starting"
    status: str = "n/a"
    run_id: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    metrics_url: str | None = None
    prometheus_url: str | None = None
    # SuperNodes that exited during the run; it went on with the others.
    lost_nodes: list[str] = field(default_factory=list)
    # {"event": "lost" | "restarted" | "not-connected", "node": name, "node-id": Flower's
    #  id or None, "elapsed-s": seconds since the demo started, ("exit-code": int)}
    node_events: list[dict[str, Any]] = field(default_factory=list)
    # SuperNodes a run needs (None until known) and why (docs/demo.md).
    min_nodes: int | None = None
    min_nodes_reason: str = ""
    # What the launcher waits for right now ("" when nothing).
    waiting_for: str = ""

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


@dataclass
class DemoResult:
    """The JSON summary of a demo run."""

    success: bool
    mode: str
    status: str
    run_id: str | None
    nodes: int
    num_rounds: int
    rounds: list[dict[str, Any]]
    final_test_accuracy: float | None
    privacy: dict[str, Any]
    audit: dict[str, Any] | None
    metrics_url: str | None
    prometheus_url: str | None
    scraped: dict[str, float | None]
    elapsed_s: float
    error: str | None
    processes: list[dict[str, Any]]
    workdir: str | None
    lost_nodes: list[str] = field(default_factory=list)
    node_events: list[dict[str, Any]] = field(default_factory=list)
    # The SuperNodes the run needed and why (e.g. "SecAgg+ k=3, t=2 tolerates 1 loss").
    min_nodes: int | None = None
    min_nodes_reason: str = ""
    # True: `status` is the run's end as the SuperLink reported it; False: the last
    # status read before the launcher stopped (or gave up), not necessarily the end.
    status_final: bool = False
    # "SIGINT" / "SIGTERM" when the demo was interrupted (every process was stopped).
    interrupted: str | None = None
    # The SuperNodes ran under the node operator's guard (flwr_guard.node).
    node_guard: bool = False

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


class _ProgressTail:
    """Read the JSON lines the ServerApp appends, as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete, _, _ = chunk.rpartition("\n")  # leave a half-written line for later
        if not complete:
            return []
        self.offset += len(complete.encode("utf-8")) + 1
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


# What the demo reads back from its Prometheus at the end: proof that the metrics of the
# run were served and scraped (None: no sample in the last hour).
SCRAPED_QUERIES = {
    "round": "max(last_over_time(flwr_guard_round[1h]))",
    "server-accuracy": 'max(last_over_time(flwr_guard_accuracy_ratio{phase="server"}[1h]))',
    "dp-epsilon-record": 'max(last_over_time(flwr_guard_dp_epsilon{level="record"}[1h]))',
    "secagg-surviving-clients": "max(last_over_time(flwr_guard_secagg_surviving_clients[1h]))",
    "audits": "max(last_over_time(flwr_guard_audits_total[1h]))",
    # robustness evaluation (--robust-eval-every; docs/robustness.md)
    "robust-pgd-accuracy-0.1": 'min(last_over_time(flwr_guard_robust_accuracy_ratio{attack="pgd",eps="0.1"}[1h]))',
    "masking-suspected": "max(last_over_time(flwr_guard_robust_masking_suspected[1h]))",
}


def app_config_keys(app_dir: Path) -> set[str]:
    """Keys of ``[tool.flwr.app.config]`` in the app's ``pyproject.toml``."""
    with (Path(app_dir) / "pyproject.toml").open("rb") as handle:
        manifest = tomllib.load(handle)
    return set(manifest.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _scraped_values(prometheus: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, expr in SCRAPED_QUERIES.items():
        try:
            out[name] = prometheus.value(expr)
        except Exception as err:
            logger.warning("Prometheus query %s failed: %s", expr, err)
            out[name] = None
    return out


def _absorb(events: list[dict[str, Any]], state: DemoState) -> dict[str, Any] | None:
    """Append the round events to ``state``; return the closing event if it is there."""
    finished = None
    for event in events:
        if event.get("event") == "round":
            state.rounds.append(event)
        elif event.get("event") == "finished":
            finished = event
    return finished


def app_config_defaults(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's ``pyproject.toml`` (its defaults)."""
    with (Path(app_dir) / "pyproject.toml").open("rb") as handle:
        manifest = tomllib.load(handle)
    return dict(manifest.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def default_min_nodes(
    nodes: int,
    secagg: bool,
    num_shares: int | None = None,
    reconstruction_threshold: int | None = None,
    node_config: dict[str, Any] | None = None,
) -> tuple[int, str]:
    """The SuperNodes a run needs by default, and why.

    With SecAgg+ (``secagg``): a round of a cohort of ``nodes`` completes after any
    ``k - t`` losses (every survivor keeps at least t of its k neighbours; k and t as
    the strategy picks them, :meth:`~flwr_guard.secagg.params.SecAggParams.for_cohort`,
    or as given, for the nodes' colluder bound C), and no client accepts a cohort below
    its policy's smallest sum (``secagg-min-cohort``, and C + 1 + h with a colluder
    bound: :func:`~flwr_guard.secagg.policy.policy_from_node_config` of ``node_config``).
    So the minimum is ``max(nodes - (k - t), smallest sum)``, at most ``nodes``. Without
    SecAgg+ the aggregation needs one node.

    Returns:
        ``(min_nodes, reason)``; ``reason`` is one sentence for logs and the summary.

    Raises:
        ValueError: ``nodes`` < 1, or a node config the SecAgg+ policy refuses.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if not secagg:
        return 1, "without SecAgg+ a round aggregates whatever nodes are left"
    if nodes < 2:
        return nodes, "SecAgg+ needs every node of a cohort of 1"
    from flwr_guard.secagg.params import SecAggParams
    from flwr_guard.secagg.policy import policy_from_node_config

    policy = policy_from_node_config(node_config or {})
    # The nodes' C (roster or secagg-max-colluders), as the server picks k and t for it.
    params = SecAggParams.for_cohort(nodes, num_shares or None, reconstruction_threshold or None,
                                     max_colluders=policy.colluders)
    k, t = params.num_shares, params.reconstruction_threshold
    tolerated = max(0, k - t)
    min_cohort = policy.min_sum  # secagg-min-cohort, and C + 1 + h with a colluder bound
    needed = min(nodes, max(nodes - tolerated, min_cohort))
    why = (f"SecAgg+ with k={k}, t={t} for a cohort of {nodes} completes a round after up to "
           f"{tolerated} lost node(s)")
    if needed > nodes - tolerated:
        why += f"; the nodes' policy needs a cohort of at least {min_cohort}"
    return needed, why


class _Interrupts:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (and are remembered by name) while
    the demo runs; :meth:`deferred` holds them (recorded, not raised) while processes
    are being stopped, so a second Ctrl-C cannot leave one behind. Installs nothing
    outside the main thread (Python delivers signals only there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._defer = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._defer:
            self.received = self.received or name
            logger.warning("%s received: every process of the demo is being stopped", name)
            return
        self.received = self.received or name
        raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False


class _Nodes:
    """The SuperNodes as the run needs them: losses, restarts and whether enough are left."""

    def __init__(self, deployment: LocalDeployment, state: DemoState, options: DemoOptions,
                 min_nodes: int) -> None:
        self.deployment, self.state, self.options, self.min_nodes = (
            deployment, state, options, min_nodes)
        self.restarts: dict[str, int] = {}
        # restarted SuperNodes not connected yet: name -> (deadline, its "restarted" event)
        self.connecting: dict[str, tuple[float, dict[str, Any]]] = {}
        self.overdue: set[str] = set()

    def check(self) -> None:
        """Record SuperNodes that exited (restarting them if the options say so) and
        restarted ones that connected or did not in time.

        Raises:
            DeploymentError: the SuperLink exited, or a SuperNode did with
                ``tolerate_node_loss`` off, or none is left.
        """
        for name in self.deployment.check_alive(self.options.tolerate_node_loss):
            self._lost(name)
        now = time.monotonic()
        for name, (deadline, event) in list(self.connecting.items()):
            node_id = self.deployment.node_id(name)
            if node_id is not None:
                event["node-id"] = node_id
                del self.connecting[name]
            elif now >= deadline:
                del self.connecting[name]
                self.overdue.add(name)
                self.state.node_events.append(self._event("not-connected", name, None))
                logger.error("%s was restarted but did not connect within %.0f s; it counts "
                             "as lost", name, self.options.startup_timeout_s)

    @property
    def left(self) -> int:
        """SuperNodes running and connected, or restarted and still within their
        connection timeout."""
        return sum(1 for p in self.deployment.supernodes
                   if p.name not in self.deployment.lost and p.name not in self.overdue)

    def blocked(self) -> str | None:
        """Why the run cannot go on (fewer SuperNodes left than it needs); ``None``: it can."""
        if not self.deployment.supernodes or self.left >= self.min_nodes:
            return None  # (a simulation has no SuperNode processes)
        gone = sorted({*self.deployment.lost, *self.overdue})
        return (f"{self.left} of {self.options.nodes} SuperNodes left ({', '.join(gone)} lost), "
                f"fewer than the {self.min_nodes} the run needs (min-nodes: "
                f"{self.state.min_nodes_reason or 'as given'}); Flower would wait for them "
                "forever, so the launcher stopped the run. Restart the demo, run with "
                "--restart-lost-nodes, or with a smaller --min-nodes")

    def _event(self, kind: str, name: str, node_id: int | None, **extra: Any) -> dict[str, Any]:
        return {"event": kind, "node": name, "node-id": node_id,
                "elapsed-s": round(self.state.elapsed_s, 2), **extra}

    def _lost(self, name: str) -> None:
        """Record a SuperNode that exited (SecAgg+ counts it as a dropout once Flower
        reports it unavailable); restart it when the options say so."""
        deployment, state, options = self.deployment, self.state, self.options
        proc = next(p for p in deployment.supernodes if p.name == name)
        node_id = deployment.node_id(name)
        self.connecting.pop(name, None)
        state.lost_nodes.append(name)
        state.node_events.append(self._event("lost", name, node_id, **{"exit-code": proc.exit_code()}))
        logger.warning("%s (node %s) lost after %.1f s; Flower reports it unavailable within "
                       "%.0f s of its last heartbeat", name, node_id, state.elapsed_s,
                       NODE_UNAVAILABLE_AFTER_S)
        if options.restart_lost_nodes and self.restarts.get(name, 0) < options.max_restarts_per_node:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            deployment.restart_supernode(name)
            self.overdue.discard(name)
            event = self._event("restarted", name, None, **{"previous-node-id": node_id})
            state.node_events.append(event)
            self.connecting[name] = (time.monotonic() + options.startup_timeout_s, event)
        elif options.restart_lost_nodes:
            logger.error("%s exited after %d restarts; it is not restarted again", name,
                         self.restarts.get(name, 0))

    def waiting_for(self) -> str:
        if not self.connecting:
            return ""
        return "restarted SuperNode(s) to connect: " + ", ".join(
            f"{name} (at most {max(0.0, deadline - time.monotonic()):.0f} s more)"
            for name, (deadline, _) in self.connecting.items())


def demo_node_guard_config(app_dir: Path, node_config: dict[str, Any],
                           run_config: dict[str, Any]) -> dict[str, Any]:
    """The node guard's node config for the demo's SuperNodes, as their operator sets it:
    the demo's app pinned on the allow-list (its FAB hash, what ``flwr-guard node
    fab-hash APP_DIR`` prints) unless ``node_config`` names an allow-list itself, and
    SecAgg+ required unless the run turns it off (``secagg = false``: the operator agrees).
    """
    from flwr.cli.build import build_fab_from_disk

    from flwr_guard.guard.policy import NODE_REQUIRE_SECAGG
    from flwr_guard.node.allowlist import (
        NODE_ALLOW_ANY,
        NODE_ALLOWLIST,
        NODE_HASHES,
        NODE_TRUSTED_KEYS,
        fab_hash,
    )

    out: dict[str, Any] = {}
    if not any(key in node_config for key in (NODE_ALLOWLIST, NODE_HASHES, NODE_TRUSTED_KEYS,
                                              NODE_ALLOW_ANY)):
        out[NODE_HASHES] = fab_hash(build_fab_from_disk(app_dir))
    if NODE_REQUIRE_SECAGG not in node_config:
        out[NODE_REQUIRE_SECAGG] = bool(run_config.get("secagg", True))
    return out


def run_demo(
    options: DemoOptions, on_update: Callable[[DemoState], None] = lambda _: None
) -> DemoResult:
    """Run the demo; return its summary (also written to ``options.summary_path``).
    Never leaves a process behind and never waits without a bound.

    Raises:
        ValueError: for invalid options (nothing is started).
        PortInUseError: if ``superlink_port`` is taken (nothing is started).
        KeyboardInterrupt: on Ctrl-C or SIGTERM, re-raised after every process has been
            stopped and the summary (``interrupted``: the signal's name) was written.
    """
    options.validate()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="flwr-guard-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    progress_path = workdir / "progress.jsonl"
    # SecAgg+ federation roster (docs/secagg.md): a stable signing key per SuperNode and
    # the signed roster of their public keys, written before any SuperNode starts. One
    # operator runs every node here, so a 2-node demo accepts a cohort of 2.
    per_node = () if options.simulation else tuple(write_federation(
        tempfile.mkdtemp(prefix="secagg-", dir=workdir), options.nodes,
        # one operator runs every node; below 5 nodes the roster's default C = 1 leaves no dropout
        min_cohort=min(options.nodes, 3) if 2 <= options.nodes < 5 else None,
    ))
    node_config = dict(options.node_config)
    if options.app_dir is None and not options.simulation and options.run_config.get(RunConfig.SECAGG, True):
        # The reference app's SuperNodes, as their operator would: no update leaves them
        # unless SecAgg+ masks it (flwr_guard.guard.policy, node config).
        node_config.setdefault(NodeConfig.GUARD_REQUIRE_SECAGG, True)
    if not options.simulation:  # each operator's `flwr-guard ledger init` (docs/privacy.md)
        from flwr_guard.dp.node_policy import data_source
        from flwr_guard.dp.record_ledger import init_ledger, ledger_path

        for key, value in ((NodeConfig.DP_SGD_MAX_EPSILON, 8.0), (NodeConfig.DP_SGD_MIN_NOISE_MULTIPLIER, 1.0),
                           (NodeConfig.DP_MIN_NOISE_MULTIPLIER, 0.5), (NodeConfig.DP_HONEST_CONTRIBUTORS, 2)):
            node_config.setdefault(key, value)  # explicit floors, as an operator would set
        ledgers = str(node_config.setdefault(NodeConfig.DP_SGD_LEDGER, str(workdir / "dp-sgd-ledger")))
        for source in {data_source({NodeConfig.PARTITION_ID: i, **node_config}) for i in range(options.nodes)}:
            if not ledger_path(ledgers, source).exists():
                init_ledger(ledgers, source)
    app_dir = options.app_dir or digits_app_dir()
    node_guard = options.node_guard and not options.simulation
    if node_guard:
        node_config.update(demo_node_guard_config(app_dir, node_config, options.run_config))
    topology = Topology.on_free_ports(
        nodes=options.nodes,
        superlink_port=options.superlink_port,
        simulation=options.simulation,
        node_config=node_config,
        per_node_config=per_node,
    )
    metrics_port = preferred_port(9464)  # 9464 unless taken, then a free port
    app_defaults = app_config_defaults(app_dir)
    declared = set(app_defaults)

    def setting(key: str, default: Any) -> Any:
        return options.run_config.get(key, app_defaults.get(key, default))

    if options.min_nodes is not None:
        min_nodes, min_reason = options.min_nodes, "--min-nodes"
    elif options.simulation:
        min_nodes, min_reason = options.nodes, "a simulation loses no node"
    else:
        min_nodes, min_reason = default_min_nodes(
            options.nodes, bool(setting(RunConfig.SECAGG, False)),
            int(setting(RunConfig.SECAGG_NUM_SHARES, 0)), int(setting(RunConfig.SECAGG_RECONSTRUCTION_THRESHOLD, 0)),
            {**node_config, **(per_node[0] if per_node else {})},
        )
    optional = {
        RunConfig.METRICS_PORT: metrics_port,
        RunConfig.METRICS_LINGER: 2.0,  # one more scrape after the last round
        # Every node audits every round, 5 s each (the app's default: 20 % of the rounds,
        # half the nodes, 10 s).
        RunConfig.AUDIT_ROUND_FRACTION: 1.0,
        RunConfig.AUDIT_CLIENT_FRACTION: 1.0,
        RunConfig.AUDIT_TIME_BUDGET: 5.0,
    }
    # Flower refuses a run config with keys the app does not declare (`--app` may be a
    # user's own app, e.g. Flower's quickstart): the demo's keys go only to apps that
    # declare them; the user's own --run-config goes as given.
    demo_keys = {
        "num-server-rounds": options.rounds,
        "min-nodes": min_nodes,
        "partitioner": options.partition,
        "dirichlet-alpha": options.alpha,
        "seed": options.seed,
        "progress-file": str(progress_path),
        # the nodes' secagg-max-colluders=0 below 5 nodes (write_federation above)
        **({RunConfig.SECAGG_MAX_COLLUDERS: 0} if per_node and options.nodes < 5 else {}),
        **optional,
    }
    run_config: dict[str, Any] = {
        **{key: value for key, value in demo_keys.items() if key in declared},
        **options.run_config,
    }
    serves_metrics = RunConfig.METRICS_PORT in declared
    state = DemoState(
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics" if serves_metrics else None,
        min_nodes=min_nodes, min_nodes_reason=min_reason,
    )
    if not options.simulation:
        logger.info("the run goes on while at least %d of %d SuperNodes are left (%s)",
                    min_nodes, options.nodes, min_reason)
    prometheus = (
        local_prometheus_if_installed(
            {"flwr-guard": [f"127.0.0.1:{metrics_port}"]}, workdir=workdir / "prometheus"
        )
        if options.prometheus and serves_metrics
        else None
    )
    finished: dict[str, Any] = {}
    scraped: dict[str, float | None] = {}
    tail = _ProgressTail(progress_path)
    error: str | None = None
    status_final = False
    processes: list[dict[str, Any]] = []
    deployment = LocalDeployment(
        topology, workdir, startup_timeout=options.startup_timeout_s,
        superexec_poll_interval_s=options.superexec_poll_interval_s, node_guard=node_guard,
    )
    nodes = _Nodes(deployment, state, options, min_nodes)
    tracker: StatusTracker | None = None
    for port in (topology.superlink_port, *topology.supernode_ports):
        ensure_port_free(port, topology.host)  # PortInUseError before anything starts
    interrupts = _Interrupts()
    with interrupts:
        try:
            if prometheus is not None:
                try:
                    prometheus.start()
                    state.prometheus_url = prometheus.url
                except PrometheusError as err:  # metrics are a view, not a reason to fail
                    logger.warning("no local Prometheus: %s", err)
            state.waiting_for = (f"the SuperLink and {0 if options.simulation else options.nodes} "
                                 f"SuperNode(s) to start and connect (at most "
                                 f"{options.startup_timeout_s:.0f} s each)")
            on_update(state)
            deployment.start()
            state.phase, state.waiting_for = "submitting", ""
            on_update(state)
            run_id = state.run_id = deployment.submit(app_dir, run_config)
            state.phase = "running"
            tracker = StatusTracker(
                read=lambda timeout: deployment.run_info(run_id, timeout=timeout),
                # The run's own timeout stops it first (_follow); reads may go on for
                # STOP_GRACE_S more to see it end.
                deadline=state.started + options.timeout_s + STOP_GRACE_S,
                policy=StatusPolicy(interval_s=options.status_interval_s,
                                    finishing_interval_s=options.status_interval_finishing_s),
                what=f"run {run_id}",
            )
            error, finished = _follow(deployment, state, options, nodes, tracker, tail, on_update)
            status_final = tracker.finished
            # The run may end before its last lines were read: read them now.
            finished = _absorb(tail.read_new(), state) or finished
            server_log = workdir / "serverapp.log"
            server_log.write_text(deployment.run_log(run_id), encoding="utf-8")
        except DeploymentError as err:
            error = str(err)
            if tracker is not None:
                status_final = _stop_and_read(deployment, state, tracker)
        except KeyboardInterrupt:
            pass  # interrupts.received names the signal
        finally:
            with interrupts.deferred():
                state.phase, state.waiting_for = "stopping", ""
                try:
                    on_update(state)
                except KeyboardInterrupt:
                    pass
                finished = _absorb(tail.read_new(), state) or finished
                deployment.stop()  # every process, by PID
                if prometheus is not None:
                    scraped = _scraped_values(prometheus) if state.prometheus_url else {}
                    prometheus.stop()  # by its PID; its data stays in workdir/prometheus
                processes = [
                    {"pid": r.pid, "create_time": r.create_time, "name": r.name}
                    for r in deployment.processes_seen()
                ]
                if interrupts.received:
                    error = (f"interrupted by {interrupts.received} after {state.elapsed_s:.0f} s "
                             f"(run {state.run_id or 'not submitted'}, last status read: "
                             f"{state.status}); every process of the demo was stopped"
                             + (f"; before that: {error}" if error else ""))
                result = _result(options, state, workdir, error, finished, scraped, processes,
                                 status_final, interrupts.received)
                on_update(state)
                if options.summary_path is not None:
                    result.write(options.summary_path)
                if not (options.keep_workdir or not result.success or options.workdir is not None):
                    shutil.rmtree(workdir, ignore_errors=True)
    if interrupts.received:
        raise KeyboardInterrupt
    return result


def _follow(
    deployment: LocalDeployment, state: DemoState, options: DemoOptions, nodes: _Nodes,
    tracker: StatusTracker, tail: _ProgressTail, on_update: Callable[[DemoState], None],
) -> tuple[str | None, dict[str, Any]]:
    """Follow the run until the SuperLink reports it finished; return ``(error, the
    ServerApp's closing event)``.

    Raises:
        DeploymentError: a process died (see :meth:`_Nodes.check`), or the status could
            not be read before the deadline (the run is then asked to stop).
    """
    run_id = str(state.run_id)
    finished: dict[str, Any] = {}
    stopping: str | None = None  # why the launcher asked the SuperLink to stop the run
    while not tracker.finished:
        nodes.check()
        last = _absorb(tail.read_new(), state)
        if last is not None and not finished:  # the ServerApp is done: ask often, not long
            finished = last
            tracker.finishing()
            tracker.deadline = min(tracker.deadline, time.monotonic() + FINISHED_GRACE_S)
        if stopping is None:
            if not finished and (why := nodes.blocked()) is not None:
                stopping = why
            elif state.elapsed_s > options.timeout_s:
                stopping = f"run {run_id} did not finish within {options.timeout_s:.0f} s"
            if stopping is not None:
                logger.error("%s", stopping)
                state.phase = "stopping-run"
                deployment.stop_run(run_id)
                tracker.extend_deadline(time.monotonic() + STOP_GRACE_S)
                tracker.read_now()
        state.waiting_for = nodes.waiting_for() or (
            f"run {run_id} to end as the SuperLink reports it" if stopping or finished else "")
        try:
            info = tracker.poll()
        except StatusUnknown as err:
            state.status = UNKNOWN
            raise DeploymentError(f"{stopping}; {err}" if stopping else str(err)) from err
        if info is not None:
            state.status = tracker.status
        on_update(state)
        if not tracker.finished:
            time.sleep(0.5)
    if state.status == COMPLETED:
        if stopping:
            logger.warning("run %s completed before the stop took effect", run_id)
        return None, finished
    details = tracker.record.get("status-details", "")
    ended = f"run {run_id} ended as {state.status}" + (f": {details}" if details else "")
    return (f"{stopping}; {ended}" if stopping else ended), finished


def _stop_and_read(deployment: LocalDeployment, state: DemoState, tracker: StatusTracker) -> bool:
    """After a fatal error with a run submitted: if the SuperLink still runs, ask it to
    stop the run and read the status until it has finished (at most STOP_GRACE_S);
    return whether ``state.status`` is the run's end."""
    superlink = deployment.superlink
    if tracker.finished or superlink is None or superlink.exit_code() is not None:
        return tracker.finished
    state.phase = "stopping-run"
    deployment.stop_run(str(state.run_id))
    tracker.deadline = time.monotonic() + STOP_GRACE_S
    tracker.read_now()
    while not tracker.finished:
        try:
            if tracker.poll() is not None:
                state.status = tracker.status
        except StatusUnknown as err:
            logger.warning("%s", err)
            return False
        if not tracker.finished:
            time.sleep(0.5)
    return True


def _result(
    options: DemoOptions, state: DemoState, workdir: Path, error: str | None,
    finished: dict[str, Any], scraped: dict[str, float | None], processes: list[dict[str, Any]],
    status_final: bool, interrupted: str | None,
) -> DemoResult:
    success = error is None and state.status == COMPLETED and interrupted is None
    state.phase = "done" if success else ("interrupted" if interrupted else "failed")
    server_rounds = [r for r in state.rounds if r["round"] > 0]
    final = server_rounds[-1]["server"].get("test-accuracy") if server_rounds else None
    last = server_rounds[-1] if server_rounds else {}
    # Epsilon spent: that of the last round that trained (a round the budget refused
    # has no train metrics).
    spent = [r["train"][ReplyMetrics.DP_SGD_EPSILON] for r in server_rounds
             if ReplyMetrics.DP_SGD_EPSILON in r.get("train", {})]
    privacy = {**last.get("privacy", {}), ReplyMetrics.DP_SGD_EPSILON: spent[-1] if spent else None}
    keep = options.keep_workdir or not success or options.workdir is not None
    return DemoResult(
        success=success,
        mode="simulation" if options.simulation else "deployment",
        status=state.status,
        run_id=state.run_id,
        nodes=options.nodes,
        num_rounds=options.rounds,
        rounds=state.rounds,
        final_test_accuracy=final,
        privacy=privacy,
        audit=finished.get("audit"),
        metrics_url=state.metrics_url,
        prometheus_url=state.prometheus_url,
        scraped=scraped,
        elapsed_s=round(state.elapsed_s, 2),
        error=error,
        processes=processes,
        workdir=str(workdir) if keep else None,
        lost_nodes=list(state.lost_nodes),
        node_events=list(state.node_events),
        min_nodes=state.min_nodes,
        min_nodes_reason=state.min_nodes_reason,
        status_final=status_final,
        interrupted=interrupted,
        node_guard=options.node_guard and not options.simulation,
    )
