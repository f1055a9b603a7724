"""Submit a run to a SuperLink and wait for its final status: the compose ``submit`` step.

``flwr run --stream`` exits 0 even when the ServerApp fails (design.md, Flower 1.41),
so a container that only streams the logs reports success for a failed run. This step
runs ``flwr run APP CONNECTION --format json``, then asks ``flwr ls CONNECTION --run-id
ID --format json`` until the status is final (``finished:...``), prints the ServerApp's
log (``flwr log ID CONNECTION --show``) and exits

- 0 when the run ended ``finished:completed``,
- 1 when it ended otherwise (the status and its details are printed),
- 2 when it was refused, the SuperLink stopped answering, or the run did not end within
  ``--timeout`` seconds (the run is then stopped).

    python -m flwr_guard.deployment.submit --connection compose --timeout 1800 \\
        /opt/flwr-guard/apps/digits num-server-rounds=5 min-nodes=3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

COMPLETED = "finished:completed"
FINISHED_PREFIX = "finished:"
# Consecutive failed `flwr ls` calls after which the SuperLink counts as gone.
MAX_FAILED_READS = 5

Runner = Callable[[list[str], float], subprocess.CompletedProcess]


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class SubmitError(RuntimeError):
    """The run was refused, or its status could not be read."""


def submit_run(app: str, connection: str, run_config: Sequence[str], runner: Runner = _run) -> str:
    """``flwr run APP CONNECTION --format json``; return the run id.

    Args:
        run_config: ``key=value`` entries (TOML values), each passed as ``--run-config``.

    Raises:
        SubmitError: Flower's message when the SuperLink refuses the run.
    """
    argv = ["flwr", "run", app, connection, "--format", "json"]
    for entry in run_config:
        argv += ["--run-config", entry]
    done = runner(argv, 300.0)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not isinstance(reply, dict) or not reply.get("success"):
        why = (reply.get("error") if isinstance(reply, dict) else None) or done.stdout.strip() or done.stderr.strip()
        raise SubmitError(f"flwr run was refused (exit {done.returncode}): {why}")
    return str(reply["run-id"])


def run_status(run_id: str, connection: str, runner: Runner = _run) -> dict[str, Any]:
    """The run's record from ``flwr ls CONNECTION --run-id ID --format json``.

    Raises:
        SubmitError: ``flwr ls`` failed, timed out (60 s) or printed no run record.
    """
    try:
        done = runner(["flwr", "ls", connection, "--run-id", run_id, "--format", "json"], 60.0)
    except subprocess.TimeoutExpired:
        raise SubmitError("flwr ls did not answer within 60 s") from None
    try:
        return dict(json.loads(done.stdout)["runs"][0])
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise SubmitError(f"cannot read the status of run {run_id}: {done.stdout or done.stderr}") from None


def wait_for_final_status(
    run_id: str,
    connection: str,
    timeout_s: float,
    interval_s: float = 10.0,
    runner: Runner = _run,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the run's status until it starts with ``finished:``.

    Raises:
        SubmitError: the run is not final after ``timeout_s`` seconds, or ``flwr ls``
            failed MAX_FAILED_READS times in a row.
    """
    deadline = clock() + timeout_s
    failures = 0
    while True:
        try:
            info = run_status(run_id, connection, runner)
            failures = 0
            if str(info.get("status", "")).startswith(FINISHED_PREFIX):
                return info
        except SubmitError as err:
            failures += 1
            print(f"submit: run {run_id} status unknown ({err})", file=sys.stderr, flush=True)
            if failures >= MAX_FAILED_READS:
                raise
        if clock() >= deadline:
            raise SubmitError(f"run {run_id} did not finish within {timeout_s:.0f} s")
        sleep(interval_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_guard.deployment.submit",
        description="Submit a Flower run and exit non-zero unless it completes.",
    )
    parser.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between status reads")
    parser.add_argument("app", help="directory of the Flower app (its pyproject.toml)")
    parser.add_argument("run_config", nargs="*", help="run config entries key=value (TOML values)")
    return parser


def main(argv: Sequence[str] | None = None, runner: Runner = _run) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_id = submit_run(args.app, args.connection, args.run_config, runner)
    except SubmitError as err:
        print(f"submit: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"submit: run {run_id} submitted; waiting for its final status", flush=True)
    try:
        info = wait_for_final_status(run_id, args.connection, args.timeout, args.interval, runner)
    except SubmitError as err:
        print(f"submit: {err}; stopping run {run_id}", file=sys.stderr, flush=True)
        runner(["flwr", "stop", run_id, args.connection], 60.0)
        return 2
    log = runner(["flwr", "log", run_id, args.connection, "--show"], 120.0)
    print(log.stdout, end="", flush=True)
    status = str(info.get("status"))
    if status == COMPLETED:
        print(f"submit: run {run_id} {status}", flush=True)
        return 0
    print(f"submit: run {run_id} ended as {status}: {info.get('status-details', '')}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
