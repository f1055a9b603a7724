"""`flwr-guard demo`: the reference app on a real local Flower deployment, end to end.

Starts a SuperLink and N SuperNodes on 127.0.0.1 (or a simulation SuperLink), submits
the digits app with ``flwr run``, follows its progress and its real status, and stops
every process it started whatever happens (success, failure, Ctrl-C).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr_guard.apps.digits import app_dir as digits_app_dir
from flwr_guard.deployment import DeploymentError, LocalDeployment, Topology
from flwr_guard.deployment.local import FINISHED_PREFIX

COMPLETED = "finished:completed"


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
    # `flwr ls` costs ~2 s of CPU: ask for the status rarely while rounds are coming,
    # often once the ServerApp says it has finished.
    status_interval_s: float = 10.0
    status_interval_finishing_s: float = 1.0
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


@dataclass
class DemoState:
    """What the demo knows while the run goes on (passed to the progress callback)."""

    phase: str = "starting"
    status: str = "n/a"
    run_id: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

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
    elapsed_s: float
    error: str | None
    processes: list[dict[str, Any]]
    workdir: str | None

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
    topology = Topology.on_free_ports(
        nodes=options.nodes,
        superlink_port=options.superlink_port,
        simulation=options.simulation,
        node_config=options.node_config,
    )
    run_config: dict[str, Any] = {
        "num-server-rounds": options.rounds,
        "min-nodes": options.nodes,
        "partitioner": options.partition,
        "dirichlet-alpha": options.alpha,
        "seed": options.seed,
        "progress-file": str(progress_path),
        **options.run_config,
    }
    state = DemoState()
    tail = _ProgressTail(progress_path)
    error: str | None = None
    deployment = LocalDeployment(topology, workdir)
    try:
        with deployment:
            state.phase = "submitting"
            on_update(state)
            state.run_id = deployment.submit(options.app_dir or digits_app_dir(), run_config)
            state.phase = "running"
            next_status, interval = 0.0, options.status_interval_s
            while not state.status.startswith(FINISHED_PREFIX):
                deployment.check_alive()
                for event in tail.read_new():
                    if event.get("event") == "round":
                        state.rounds.append(event)
                    elif event.get("event") == "finished":
                        next_status = 0.0
                        interval = options.status_interval_finishing_s
                if time.monotonic() >= next_status:
                    info = deployment.run_info(state.run_id)
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
            state.rounds += [e for e in tail.read_new() if e.get("event") == "round"]
            state.phase = "stopping"
            on_update(state)
    except DeploymentError as err:
        error = str(err)
    finally:
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
    privacy = {
        **last.get("privacy", {}),
        "dp-sgd-epsilon": last.get("train", {}).get("dp-sgd-epsilon"),
    }
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
        elapsed_s=round(state.elapsed_s, 2),
        error=error,
        processes=processes,
        workdir=str(workdir) if keep else None,
    )
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
