"""A real Flower deployment on 127.0.0.1: one SuperLink and N SuperNodes as processes.

Runs are submitted with ``flwr run`` and followed with ``flwr ls --format json``:
``flwr run`` exits 0 even when the ServerApp fails, so the run's status as the
SuperLink reports it (``finished:completed``, ``finished:failed``, ...) is what counts.

With TLS in the topology the connection carries ``root-certificates`` and the health
check verifies the SuperLink's certificate; with SuperNode authentication every
SuperNode's public key is registered (``flwr supernode register``) before it starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from flwr_guard.deployment.healthcheck import superlink_healthy
from flwr_guard.deployment.ports import ensure_port_free
from flwr_guard.deployment.processes import ManagedProcess, ProcessRecord, ProcessSupervisor
from flwr_guard.deployment.register import RegistrationError, register_supernode
from flwr_guard.deployment.status import FINISHED_PREFIX, StatusReadError
from flwr_guard.deployment.topology import Topology
from flwr_guard.errors import FlwrGuardError

logger = logging.getLogger(__name__)

CONNECTION = "flwr-guard"
__all__ = ["CONNECTION", "FINISHED_PREFIX", "DeploymentError", "LocalDeployment", "RunFailed",
           "StatusReadFailed"]


# Flower 1.41's SuperExecs (the SuperLink's, which starts the ServerApp process, and each
# SuperNode's, which starts one ClientApp process per message) look for new work every
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (flwr.supercore.superexec.run_superexec,
# 1 s by default, 0.01-60 s accepted): 0.2 s takes 0.4 s of idle time off every
# message on average, for 5 small local requests per second per SuperExec. Flower
# has no setting for the rest: a SuperNode sleeps 3 s after a pull that found no
# message and 0.5 s while its ClientApp works (flwr.supernode.start_client_internal),
# and announces a fixed 30 s heartbeat interval (flwr.common.constant).
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_INTERVAL_S = 0.2
# A dead SuperNode is reported unavailable (ErrorCode.NODE_UNAVAILABLE) when its last
# heartbeat is HEARTBEAT_PATIENCE (2) x 30 s old; it sends one every 17.5-22.5 s.
NODE_UNAVAILABLE_AFTER_S = 60.0

_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")


class DeploymentError(FlwrGuardError, RuntimeError):
    """The deployment could not start or a process of it died."""


class RunFailed(FlwrGuardError, RuntimeError):
    """A run ended in a state other than ``finished:completed``."""


class StatusReadFailed(DeploymentError, StatusReadError):
    """One ``flwr ls`` did not give the run's status (a timeout, an unreadable answer);
    no verdict on the run (:class:`~flwr_guard.deployment.status.StatusTracker` retries)."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _undeclared_hint(app_dir: Path, run_config: Mapping[str, Any]) -> str:
    """Name the run-config keys that the app's pyproject.toml does not declare (Flower
    refuses them with "Invalid run configuration" and no more)."""
    import tomllib

    try:
        with (Path(app_dir) / "pyproject.toml").open("rb") as handle:
            declared = set(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return ""
    undeclared = sorted(set(run_config) - declared)
    if not undeclared:
        return ""
    return (f" (keys not declared in [tool.flwr.app.config] of {app_dir}/pyproject.toml: "
            f"{', '.join(undeclared)}; declare them there, or leave them out)")


class LocalDeployment:
    """Start ``topology`` as local processes; a context manager that always cleans up.

    Every process goes into ``workdir/logs``; ``FLWR_HOME`` is ``workdir/flwr-home``
    with a connection named ``flwr-guard`` to the SuperLink.

    :meth:`start` returns once every SuperNode has registered with the SuperLink, so a
    run submitted then sees all of them (Flower samples whichever nodes are connected
    when a round starts); every wait is bounded by ``startup_timeout`` seconds.

    With ``node_guard`` every SuperNode runs under flwr-guard's node guard (its own
    SuperExec, :mod:`flwr_guard.node`; ``app_isolation``: ``--app-isolation`` of
    :mod:`flwr_guard.node.isolation`, ``auto`` by default). The guard is watched with
    its SuperNode: when it exits, :meth:`check_alive` stops the SuperNode (it would run
    no tasks) and reports it like any lost SuperNode, naming the guard;
    :meth:`restart_supernode` starts both again.

    Raises (from :meth:`start`):
        PortInUseError: a port of the topology is taken.
        DeploymentError: a process exited during start-up, or the SuperLink or a
            SuperNode was not ready within ``startup_timeout`` (the message holds the
            logs).
    """

    def __init__(
        self,
        topology: Topology,
        workdir: Path,
        startup_timeout: float = 60.0,
        superexec_poll_interval_s: float | None = SUPEREXEC_POLL_INTERVAL_S,
        flwr_cli: str = "flwr",
        node_guard: bool = False,
        app_isolation: str = "auto",
    ) -> None:
        if superexec_poll_interval_s is not None and not (
            0.01 <= superexec_poll_interval_s <= 60.0
        ):
            raise ValueError(
                "superexec_poll_interval_s must be in [0.01, 60] s (the range Flower 1.41 "
                f"accepts for {SUPEREXEC_POLL_ENV}), got {superexec_poll_interval_s}"
            )
        self.superexec_poll_interval_s = superexec_poll_interval_s
        self.flwr_cli = flwr_cli  # the `flwr` executable (a path, or a name on PATH)
        self.topology = topology
        self.workdir = Path(workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.startup_timeout = startup_timeout
        self.supervisor = ProcessSupervisor(self.workdir / "logs")
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.lost: list[str] = []  # SuperNodes that exited while a run went on
        # node_guard: every SuperNode runs its ClientApps under flwr-guard's node guard
        # (flwr_guard.node: --isolation process + the guard's SuperExec, docs/deploy.md).
        self.node_guard = node_guard
        # Each guarded SuperNode's guard (its SuperExec), watched with it: a SuperNode
        # whose guard died runs no tasks, so it is stopped and counts as lost.
        self.guards: dict[str, ManagedProcess] = {}
        self.guard_exits: dict[str, str] = {}  # why such a SuperNode was stopped
        self.app_isolation = app_isolation

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment of every process: Flower finds its components on ``PATH``."""
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.superexec_poll_interval_s is not None:
            env[SUPEREXEC_POLL_ENV] = str(self.superexec_poll_interval_s)
        return env

    def start(self) -> None:
        """Check ports, start the SuperLink, wait for ``/health``, start the SuperNodes."""
        topo = self.topology
        for port in (topo.superlink_port, *topo.supernode_ports):
            ensure_port_free(port, topo.host)
        self._write_flower_config()
        self.superlink = self.supervisor.start("superlink", topo.superlink_command(), self.env)
        self._wait_healthy()
        if not topo.simulation:
            if topo.supernode_auth:
                for index in range(topo.nodes):
                    self.register_supernode(topo.supernode_public_key(index))
            for index in range(topo.nodes):
                self.supernodes.append(self._start_supernode(index))
            self.wait_for_nodes()

    def stop(self) -> list[ProcessRecord]:
        """Stop every process started (and all they spawned); return any survivor."""
        survivors = self.supervisor.stop_all()
        if survivors:
            logger.error("processes survived stop: %s", survivors)
        return survivors

    def processes_seen(self) -> list[ProcessRecord]:
        """Every process of this deployment seen so far (for orphan checks)."""
        return self.supervisor.refresh()

    def check_alive(self, tolerate_node_loss: bool = False) -> list[str]:
        """Raise :class:`DeploymentError` naming a started process that has exited.

        Args:
            tolerate_node_loss: a SuperNode that exited is reported, not raised: the
                run goes on with the others (SecAgg+ counts the node as a dropout). The
                SuperLink's exit, or the loss of every SuperNode, still raises.

        Returns:
            The names of the SuperNodes lost since the last call (with
            ``tolerate_node_loss``; else always empty).

        Also records the processes alive now (what Flower spawned since the last call),
        so that :meth:`stop` finds them all.
        """
        self.supervisor.refresh()
        self._stop_unguarded_supernodes()
        why = self.guard_exits
        current = [p for p in (self.superlink, *self.supernodes) if p is not None]
        dead = [p for p in current if p.exit_code() is not None and p.name not in self.lost]
        if not dead:
            return []
        fatal = [p for p in dead if not (tolerate_node_loss and p in self.supernodes)]
        if not fatal and len(self.lost) + len(dead) >= len(self.supernodes):
            fatal = dead  # no SuperNode left: the run cannot go on
        if fatal:
            proc = fatal[0]
            if proc.name in why:
                raise DeploymentError(why[proc.name])
            raise DeploymentError(
                f"{proc.name} (pid {proc.pid}) exited with code {proc.exit_code()}; "
                f"last lines of {proc.log_path}:\n{proc.log_tail()}"
            )
        for proc in dead:
            if proc.name in why:
                logger.warning("%s; the run goes on without it", why[proc.name])
            else:
                logger.warning("%s (pid %d) exited with code %s; the run goes on without it",
                               proc.name, proc.pid, proc.exit_code())
            self.lost.append(proc.name)
        return [p.name for p in dead]

    def _stop_unguarded_supernodes(self) -> None:
        """Stop each running SuperNode whose guard (SuperExec) has exited; keep, by
        SuperNode name, why (the guard's exit and the last lines of its log) in
        :attr:`guard_exits`."""
        why = self.guard_exits
        for node in self.supernodes:
            guard = self.guards.get(node.name)
            if guard is None or node.name in self.lost or guard.exit_code() is None:
                continue
            if node.exit_code() is not None:
                continue  # the SuperNode went first (its guard follows it): a plain loss
            why[node.name] = (
                f"{guard.name} (pid {guard.pid}), the node guard of {node.name}, exited with "
                f"code {guard.exit_code()}: {node.name} runs no tasks without it and was "
                f"stopped (a lost node; a restart starts both); last lines of "
                f"{guard.log_path}:\n{guard.log_tail()}")
            node.popen.terminate()
            try:
                node.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.popen.kill()
                node.popen.wait()

    def node_id(self, name: str) -> int | None:
        """The Flower node id the current process of SuperNode ``name`` registered with
        (read from what it wrote to its log: ``SuperNode ID: N``); ``None`` before it has
        connected. A restarted SuperNode gets a new id (without SuperNode
        authentication); until it connects this is ``None``, never the old id.

        Raises:
            ValueError: ``name`` is not a SuperNode of this deployment.
        """
        proc = next((p for p in self.supernodes if p.name == name), None)
        if proc is None:
            raise ValueError(f"no SuperNode named {name!r}")
        found = _NODE_ID_LINE.findall(proc.own_log())
        return int(found[-1]) if found else None

    def wait_for_nodes(self, names: list[str] | None = None, timeout: float | None = None) -> dict[str, int]:
        """Wait until SuperNodes ``names`` (default: all not lost) have registered with
        the SuperLink (``SuperNode ID`` in their logs), at most ``timeout`` seconds
        (default: the start-up timeout). Says what it waits for (logger, INFO).

        Returns:
            Each name's Flower node id.

        Raises:
            DeploymentError: a process exited meanwhile, or some node did not connect in
                time (the message names them and holds the last lines of their logs).
        """
        names = [p.name for p in self.supernodes if p.name not in self.lost] if names is None else names
        limit = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        ids: dict[str, int] = {}
        announced = False
        while True:
            for name in names:
                if name not in ids and (node := self.node_id(name)) is not None:
                    ids[name] = node
            missing = [n for n in names if n not in ids]
            if not missing:
                return ids
            self.check_alive()
            if time.monotonic() >= deadline:
                tails = "\n".join(
                    f"--- {p.name} ({p.log_path}):\n{p.log_tail(8)}"
                    for p in self.supernodes if p.name in missing)
                raise DeploymentError(
                    f"{', '.join(missing)} did not connect to the SuperLink at "
                    f"{self.topology.superlink_address} within {limit:g} s "
                    f"({len(ids)} of {len(names)} connected):\n{tails}")
            if not announced:
                logger.info("waiting up to %g s for %d SuperNode(s) to connect: %s",
                            limit, len(missing), ", ".join(missing))
                announced = True
            time.sleep(0.25)

    def restart_supernode(self, name: str) -> ManagedProcess:
        """Start a lost SuperNode again with its command line (it joins the next round
        it is sampled in; Flower gives it a new node id unless it authenticates).

        Raises:
            ValueError: ``name`` is not a lost SuperNode of this deployment.
        """
        if name not in self.lost:
            raise ValueError(f"{name} is not a lost SuperNode (lost: {self.lost or 'none'})")
        proc = self._start_supernode(int(name.rsplit("-", 1)[1]))
        self.guard_exits.pop(name, None)
        self.supernodes = [proc if p.name == name else p for p in self.supernodes]
        self.lost.remove(name)
        return proc

    def supernode_argv(self, index: int) -> list[str]:
        """The command line that starts SuperNode ``index`` (at start and at a restart):
        the one place to wrap it (e.g. to start SuperNodes under a node-side guard)."""
        return self.topology.supernode_command(index)

    def _start_supernode(self, index: int) -> ManagedProcess:
        """Start SuperNode ``index`` (with ``node_guard``: and the guard's SuperExec)."""
        argv = self.supernode_argv(index)
        if not self.node_guard:
            return self.supervisor.start(f"supernode-{index}", argv, self.env)
        from flwr_guard.node.launch import guarded_commands, write_secret

        secret_dir = self.workdir / f"node-guard-{index}"
        secret_dir.mkdir(parents=True, exist_ok=True)
        (secret_dir / "superexec-auth-secret").unlink(missing_ok=True)
        os.chmod(secret_dir, 0o700)
        supernode, superexec = guarded_commands(argv[1:], write_secret(secret_dir),
                                                ["--app-isolation", self.app_isolation])
        proc = self.supervisor.start(f"supernode-{index}", supernode, self.env)
        self.guards[proc.name] = self.supervisor.start(
            f"node-guard-{index}", [*superexec, "--parent-pid", str(proc.pid)], self.env)
        return proc

    def _write_flower_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            self.topology.flwr_config_toml(CONNECTION), encoding="utf-8"
        )

    def _wait_healthy(self) -> None:
        url = self.topology.health_url
        ca = self.topology.tls.ca_certfile if self.topology.tls else None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if superlink_healthy(url, ca, timeout=1.0):
                return
            time.sleep(0.25)
        raise DeploymentError(f"SuperLink not healthy at {url} after {self.startup_timeout:.0f} s")

    def register_supernode(self, public_key: str | Path) -> str:
        """Admit a SuperNode: ``flwr supernode register PUBLIC_KEY``; return its node id.

        Raises:
            DeploymentError: if the SuperLink refuses the key (for instance one already
                registered, or not an EC key on a NIST curve).
        """
        try:
            return str(register_supernode(public_key, CONNECTION, self.env))
        except RegistrationError as err:
            raise DeploymentError(str(err)) from err

    # -- runs ----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's connection."""
        return subprocess.run(
            [self.flwr_cli, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_log(self, run_id: str, timeout: float = 60.0) -> str:
        """The run's ServerApp log as the SuperLink keeps it (``flwr log --show``);
        an empty string when the SuperLink has none."""
        try:
            done = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("flwr log did not answer within %.0f s: no ServerApp log", timeout)
            return ""
        return done.stdout if done.returncode == 0 else ""

    def submit(self, app_dir: Path, run_config: Mapping[str, Any] | None = None) -> str:
        """``flwr run`` the app in ``app_dir``; return the run id.

        Raises:
            DeploymentError: if the SuperLink does not accept the run.
        """
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        for key, value in (run_config or {}).items():
            args += ["--run-config", f"{key}={_toml_value(value)}"]
        if self.topology.simulation:
            args += ["--federation-config", f"num-supernodes={self.topology.nodes}"]
        done = self.flwr(*args)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            why = str(reply.get("error") or done.stdout.strip() or done.stderr.strip())
            if "run configuration" in why.lower():
                why += _undeclared_hint(app_dir, run_config or {})
            raise DeploymentError(f"flwr run was refused (exit {done.returncode}): {why}")
        return str(reply["run-id"])

    def run_info(self, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The run's record from ``flwr ls --run-id ... --format json``.

        Raises:
            StatusReadFailed: (a :class:`DeploymentError`) if the SuperLink cannot be
                asked, its answer holds no record of the run, or ``flwr ls`` takes more
                than ``timeout`` seconds (more than 60 s was seen with 20 SuperNodes
                starting on 2 loaded cores). No verdict on the run: ask again
                (:class:`~flwr_guard.deployment.status.StatusTracker`).
        """
        try:
            done = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json",
                             timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise StatusReadFailed(f"flwr ls did not answer within {err.timeout:.0f} s") from err
        try:
            reply = json.loads(done.stdout)
            return dict(reply["runs"][0])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
            answer = (done.stdout or done.stderr).strip()[-500:]
            raise StatusReadFailed(
                f"cannot read the status of run {run_id} (flwr ls exit {done.returncode}): {answer}"
            ) from err

    def stop_run(self, run_id: str, timeout: float = 60.0) -> bool:
        """Ask the SuperLink to stop a run (best effort); ``True`` if ``flwr stop``
        succeeded (the run's status then becomes ``finished:stopped`` unless it had
        already finished)."""
        try:
            done = self.flwr("stop", run_id, CONNECTION, timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("flwr stop %s did not answer within %.0f s", run_id, timeout)
            return False
        if done.returncode != 0:
            logger.warning("flwr stop %s failed (exit %d): %s", run_id, done.returncode,
                           (done.stdout or done.stderr).strip()[-300:])
        return done.returncode == 0
