"""`flwr-guard demo`: the reference app on a real local Flower deployment, end to end.

Starts a SuperLink and N SuperNodes on 127.0.0.1 (or a simulation SuperLink), submits
the digits app with ``flwr run``, follows its progress and its real status, and stops
every process it started whatever happens (success, failure, Ctrl-C).

Every protection is on: SecAgg+, DP-SGD with a record-level budget, the leakage audit
and reply inspection; the ServerApp exports Prometheus metrics and, when the
``prometheus`` binary is installed (``make tools``), a local Prometheus scrapes them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr_guard.apps.digits import app_dir as digits_app_dir
from flwr_guard.deployment import DeploymentError, LocalDeployment, Topology
from flwr_guard.deployment.local import (
    FINISHED_PREFIX,
    NODE_UNAVAILABLE_AFTER_S,
    SUPEREXEC_POLL_INTERVAL_S,
)
from flwr_guard.secagg.keys import write_federation
from flwr_guard.telemetry.exporter import preferred_port
from flwr_guard.telemetry.prometheus_server import (
    PrometheusError,
    local_prometheus_if_installed,
)

COMPLETED = "finished:completed"
# Consecutive `flwr ls` failures (each a timeout of 60 s or an error) that end the demo.
MAX_FAILED_STATUS_READS = 3

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
    # all of them. With fewer, the run goes on after a node loss without a restart;
    # with all of them, each round after a loss waits for the node to come back.
    min_nodes: int | None = None
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL of every SuperExec (None: Flower's 1 s).
    superexec_poll_interval_s: float | None = SUPEREXEC_POLL_INTERVAL_S
    timeout_s: float = 3600.0

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
    # {"event": "lost" | "restarted", "node": name, "node-id": Flower's id or None,
    #  "elapsed-s": seconds since the demo started, ("exit-code": int)}
    node_events: list[dict[str, Any]] = field(default_factory=list)

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


def _node_lost(
    deployment: LocalDeployment, state: DemoState, name: str, options: DemoOptions
) -> None:
    """Record a SuperNode that exited (SecAgg+ counts it as a dropout once Flower
    reports it unavailable); restart it when the options say so."""
    proc = next(p for p in deployment.supernodes if p.name == name)
    node_id = deployment.node_id(name)
    state.lost_nodes.append(name)
    state.node_events.append({"event": "lost", "node": name, "node-id": node_id,
                              "elapsed-s": round(state.elapsed_s, 2),
                              "exit-code": proc.exit_code()})
    logger.warning("%s (node %s) lost after %.1f s; Flower reports it unavailable within "
                   "%.0f s of its last heartbeat", name, node_id, state.elapsed_s,
                   NODE_UNAVAILABLE_AFTER_S)
    if options.restart_lost_nodes:
        deployment.restart_supernode(name)
        state.node_events.append({"event": "restarted", "node": name, "node-id": None,
                                  "elapsed-s": round(state.elapsed_s, 2),
                                  "previous-node-id": node_id})
    elif (options.min_nodes or options.nodes) > options.nodes - len(deployment.lost):
        logger.warning("every round now waits for %d connected nodes (min-nodes) and %d are "
                       "left: restart %s, or run with a smaller --min-nodes",
                       options.min_nodes or options.nodes,
                       options.nodes - len(deployment.lost), name)


def run_demo(
    options: DemoOptions, on_update: Callable[[DemoState], None] = lambda _: None
) -> DemoResult:
    """Run the demo; return its summary. Never leaves a process behind.

    Raises:
        ValueError: for invalid options (nothing is started).
        PortInUseError: if ``superlink_port`` is taken (nothing is started).
        KeyboardInterrupt: re-raised after every process has been stopped.
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
    if options.app_dir is None and not options.simulation and options.run_config.get("secagg", True):
        # The reference app's SuperNodes, as their operator would: no update leaves them
        # unless SecAgg+ masks it (flwr_guard.guard.policy, node config).
        node_config.setdefault("guard-require-secagg", True)
    if not options.simulation:  # each operator's `flwr-guard ledger init` (docs/privacy.md)
        from flwr_guard.dp.node_policy import data_source
        from flwr_guard.dp.record_ledger import init_ledger, ledger_path

        for key, value in (("dp-sgd-max-epsilon", 8.0), ("dp-sgd-min-noise-multiplier", 1.0),
                           ("dp-min-noise-multiplier", 0.5), ("dp-honest-contributors", 2)):
            node_config.setdefault(key, value)  # explicit floors, as an operator would set
        ledgers = str(node_config.setdefault("dp-sgd-ledger", str(workdir / "dp-sgd-ledger")))
        for source in {data_source({"partition-id": i, **node_config}) for i in range(options.nodes)}:
            if not ledger_path(ledgers, source).exists():
                init_ledger(ledgers, source)
    topology = Topology.on_free_ports(
        nodes=options.nodes,
        superlink_port=options.superlink_port,
        simulation=options.simulation,
        node_config=node_config,
        per_node_config=per_node,
    )
    metrics_port = preferred_port(9464)  # 9464 unless taken, then a free port
    app_dir = options.app_dir or digits_app_dir()
    optional = {
        "metrics-port": metrics_port,
        "metrics-linger": 2.0,  # one more scrape after the last round
        # Every node audits every round, 5 s each (the app's default: 20 % of the rounds,
        # half the nodes, 10 s).
        "audit-round-fraction": 1.0,
        "audit-client-fraction": 1.0,
        "audit-time-budget": 5.0,
    }
    # Flower refuses a run config with keys the app does not declare (`--app` may be a
    # user's own app, e.g. Flower's quickstart): the demo's keys go only to apps that
    # declare them; the user's own --run-config goes as given.
    declared = app_config_keys(app_dir)
    demo_keys = {
        "num-server-rounds": options.rounds,
        "min-nodes": options.min_nodes or options.nodes,
        "partitioner": options.partition,
        "dirichlet-alpha": options.alpha,
        "seed": options.seed,
        "progress-file": str(progress_path),
        # the nodes' secagg-max-colluders=0 below 5 nodes (write_federation above)
        **({"secagg-max-colluders": 0} if per_node and options.nodes < 5 else {}),
        **optional,
    }
    run_config: dict[str, Any] = {
        **{key: value for key, value in demo_keys.items() if key in declared},
        **options.run_config,
    }
    serves_metrics = "metrics-port" in declared
    state = DemoState(
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics" if serves_metrics else None
    )
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
    deployment = LocalDeployment(
        topology, workdir, superexec_poll_interval_s=options.superexec_poll_interval_s
    )
    try:
        if prometheus is not None:
            try:
                prometheus.start()
                state.prometheus_url = prometheus.url
            except PrometheusError as err:  # metrics are a view, not a reason to fail
                logger.warning("no local Prometheus: %s", err)
        with deployment:
            state.phase = "submitting"
            on_update(state)
            state.run_id = deployment.submit(app_dir, run_config)
            state.phase = "running"
            next_status, interval = 0.0, options.status_interval_s
            failed_reads = 0
            while not state.status.startswith(FINISHED_PREFIX):
                for name in deployment.check_alive(options.tolerate_node_loss):
                    _node_lost(deployment, state, name, options)
                for event in state.node_events:  # a restarted node's new id, once it has one
                    if event["event"] == "restarted" and event["node-id"] is None:
                        new_id = deployment.node_id(event["node"])
                        if new_id != event["previous-node-id"]:
                            event["node-id"] = new_id
                last = _absorb(tail.read_new(), state)
                if last is not None:  # the ServerApp is done: ask for the status often
                    finished, next_status = last, 0.0
                    interval = options.status_interval_finishing_s
                if time.monotonic() >= next_status:
                    try:
                        info: dict[str, Any] | None = deployment.run_info(state.run_id)
                        failed_reads = 0
                    except DeploymentError as err:
                        # A slow answer is no verdict on the run: ask again next time;
                        # only a SuperLink that keeps failing ends the demo.
                        failed_reads += 1
                        if failed_reads >= MAX_FAILED_STATUS_READS:
                            raise
                        logger.warning("run status unknown (%s); asking again", err)
                        info = None
                    if info is not None:
                        state.status = str(info.get("status", "unknown"))
                        if state.status.startswith(FINISHED_PREFIX) and state.status != COMPLETED:
                            details = info.get("status-details", "")
                            error = f"run {state.run_id} ended as {state.status}: {details}"
                    next_status = time.monotonic() + interval
                on_update(state)
                if state.elapsed_s > options.timeout_s:
                    deployment.stop_run(state.run_id)
                    raise DeploymentError(f"run did not finish within {options.timeout_s:.0f} s")
                time.sleep(0.5)
            # The run may end before its last lines were read: read them now.
            finished = _absorb(tail.read_new(), state) or finished
            server_log = workdir / "serverapp.log"
            server_log.write_text(deployment.run_log(state.run_id), encoding="utf-8")
            state.phase = "stopping"
            on_update(state)
    except DeploymentError as err:
        error = str(err)
    finally:
        if prometheus is not None:
            scraped = _scraped_values(prometheus) if state.prometheus_url else {}
            prometheus.stop()  # by its PID; its data stays in workdir/prometheus
        processes = [
            {"pid": r.pid, "create_time": r.create_time, "name": r.name}
            for r in deployment.processes_seen()
        ]
    success = error is None and state.status == COMPLETED
    state.phase = "done" if success else "failed"
    on_update(state)
    server_rounds = [r for r in state.rounds if r["round"] > 0]
    final = server_rounds[-1]["server"].get("test-accuracy") if server_rounds else None
    last = server_rounds[-1] if server_rounds else {}
    # Epsilon spent: that of the last round that trained (a round the budget refused
    # has no train metrics).
    spent = [r["train"]["dp-sgd-epsilon"] for r in server_rounds
             if "dp-sgd-epsilon" in r.get("train", {})]
    privacy = {**last.get("privacy", {}), "dp-sgd-epsilon": spent[-1] if spent else None}
    keep = options.keep_workdir or not success or options.workdir is not None
    result = DemoResult(
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
    )
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
