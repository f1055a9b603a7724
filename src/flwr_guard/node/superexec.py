"""The guarded SuperNode's SuperExec: Flower's own, with an executor that runs the guard.

A SuperNode started with ``flower-supernode --isolation process`` does not start a
SuperExec itself; the operator starts one next to it. This module is that SuperExec:
Flower 1.41's ``flower-superexec`` command (its arguments, its task loop, its health
server and SuperExec authentication: ``flwr.supercore.cli.flower_superexec``), with one
difference: ClientApp tasks are launched as :mod:`flwr_guard.node.runner` (the guard)
instead of ``flwr-clientapp``, with the task token written to the runner's stdin.
Every other task type (an agent app, ...) is neither acquired nor launched.

Seam: Flower 1.41 selects the executor in ``run_superexec`` through the module-level
``get_executor(executor_type, ...)`` and offers no option to name another; this
module replaces that one name in its own process (and nowhere else) before it calls
``flower_superexec()``. :mod:`flwr_guard.node.flower_pins` checks the names and
signatures this relies on, and its test fails loudly on a Flower upgrade.

The app's isolation (``--app-isolation {auto,sandbox,user,process}``, ``--app-user``;
:mod:`flwr_guard.node.isolation`) is resolved and checked here once, logged in one line,
and handed to every runner it launches.

Usage (the arguments of ``flower-superexec``, and the app's isolation)::

    flower-supernode --insecure --superlink HOST:PORT --isolation process \\
        --port 9094 --node-config '...' &
    flwr-guard node superexec --insecure --runtime-api-address 127.0.0.1:9094 \\
        --app-isolation sandbox
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

#: The guard's ClientApp command (the task token follows on stdin).
RUNNER = (sys.executable, "-m", "flwr_guard.node.runner")


class GuardedExecutor(SubprocessExecutor):
    """Flower's subprocess executor, launching the guard for ClientApp tasks only."""

    def __init__(self, runner: Sequence[str] = RUNNER) -> None:
        self.runner = list(runner)

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *,
                              insecure: bool = False, root_certificates_path: str | None = None,
                              ) -> tuple[set[TaskType], set[str]]:
        """Only ClientApp tasks are acquired (the guard runs nothing else)."""
        del insecure, root_certificates_path
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def command(self, spec: ExecutionSpec) -> list[str]:
        """The runner's argv for ``spec`` (no token: it goes to stdin)."""
        args = [*self.runner, "--runtime-api-address", spec.runtime_api_address, "--token-stdin"]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        return args

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Start the guard for a ClientApp task; refuse every other task type."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"the flwr-guard node guard runs only {TaskType.CLIENT_APP} tasks, not {spec.task_type}")
        if spec.runtime_dependency_install:
            return LaunchResult.failed(
                "the flwr-guard node guard does not install an app's dependencies at run "
                "time (they would run unguarded code at install): drop "
                "--allow-runtime-dependency-installation and install them on the node")
        try:
            proc = subprocess.Popen(self.command(spec), stdin=subprocess.PIPE)
            assert proc.stdin is not None
            proc.stdin.write(spec.token.encode("ascii") + b"\n")
            proc.stdin.close()
        except (OSError, UnicodeError) as err:
            return LaunchResult.failed(f"cannot start the flwr-guard runner: {err}")
        return LaunchResult.accepted()


def guarded_get_executor(executor_type: ExecutorType, executor_config: Any = None, *,
                         insecure: bool = False, root_certificates_path: str | None = None,
                         runner: Sequence[str] = RUNNER) -> GuardedExecutor:
    """Stands in for Flower's ``get_executor`` in this process.

    Raises:
        ValueError: an executor other than ``subprocess`` (Flower exits with the message).
    """
    del executor_config, insecure, root_certificates_path
    if executor_type != ExecutorType.SUBPROCESS:
        raise ValueError(f"the flwr-guard node guard supports --executor subprocess, not {executor_type}")
    return GuardedExecutor(runner)


def main(argv: Sequence[str] | None = None) -> None:
    """Run Flower's ``flower-superexec`` with the guard's executor (see the module docstring).

    ``--app-isolation`` and ``--app-user`` (:mod:`flwr_guard.node.isolation`) are resolved
    and checked once here (a test start of the app's process); the guard logs one line
    naming the isolation in force, and exits with status 2 and the fix when the
    isolation asked for cannot be had.
    """
    import importlib
    import logging

    from flwr.supercore.cli.flower_superexec import flower_superexec

    from flwr_guard.node.flower_pins import check_flower
    from flwr_guard.node.isolation import AppIsolation, IsolationError, split_isolation_args

    check_flower()
    requested, app_user, rest = split_isolation_args(sys.argv[1:] if argv is None else argv)
    try:
        isolation = AppIsolation.resolve(requested, app_user)
        isolation.check()
    except IsolationError as err:
        sys.stderr.write(f"flwr-guard node superexec: {err}\n")
        raise SystemExit(2) from None
    logger = logging.getLogger("flwr_guard.node")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.log(logging.WARNING if isolation.level == "process" else logging.INFO, isolation.describe())
    runner = [*RUNNER, *isolation.to_args()]

    def get_executor(*args: Any, **kwargs: Any) -> GuardedExecutor:
        return guarded_get_executor(*args, runner=runner, **kwargs)

    run_superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    vars(run_superexec)["get_executor"] = get_executor  # this process only
    sys.argv = ["flwr-guard node superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
