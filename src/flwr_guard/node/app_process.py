"""The boundary between the node's guard and the app's code: the app in a child process.

The guard process (:mod:`flwr_guard.node.runner`) holds the node's policy, its SecAgg+
keys and round state, and the DP state; the app's ClientApp never runs in it. For each
message that needs the app, :func:`run_app` starts ``python -m
flwr_guard.node.app_child`` and hands it, over a pipe, only

- the message (as Flower serialises it),
- a context whose node config lacks every key the node's policy owns
  (:func:`~flwr_guard.node.app_config.app_node_config`: ``guard-*`` and ``secagg-*``,
  the user-level DP floors, the ledger's location), whose ``dp-sgd-ledger`` names a
  copy of the node's record-level ledger (:class:`~flwr_guard.node.app_config.LedgerHandout`:
  written back only when the app's steps extend it), and whose state holds only the
  app's own records (:data:`APP_STATE_PREFIX`),
- the run and the FAB, which the child installs and loads with Flower's own loader,
- what the node enforces around this message (:class:`~flwr_guard.node.enforcement.NodeEnforcement`:
  the marker that lets the app's own ``ClientGuard`` step aside for SecAgg+; it travels
  on this pipe only, never in the run config, node config or message).

The child answers with its reply and its state over a second pipe (its stdout and stderr
stay the app's log). The guard rebuilds the reply itself: the metadata comes from the
message it answers (the app cannot address it elsewhere), and the content is what the
policy mods then check before anything is sent. A child that crashes, exits without an
answer or answers with more than :data:`MAX_RESULT_BYTES` yields an error reply. The
runner cuts every error text of the app to :data:`MAX_APP_REASON_CHARS` printable
characters (:func:`app_error_reason`) before the policy mods see the reply.

How far the child is kept from the guard is the operator's choice
(:mod:`flwr_guard.node.isolation`, ``--app-isolation``): under ``sandbox`` it runs as
another user with no capabilities, no network and its own PID and mount namespaces, in
a fresh workspace (its ``FLWR_HOME`` and its ledger copy) with a minimal environment, so
it cannot read the guard's SuperExec secret, keys or ledger nor reach the SuperNode or
the SuperLink; under ``user`` it runs as another user with the host's network; under
``process`` it runs as the guard's user and can read what the guard can and open
network connections: a boundary for a plain or careless app, with the FAB allow-list as
the only protection against a hostile one (docs/threat-model.md, the run-submitter row).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_to_proto,
    fab_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    run_to_proto,
)
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from flwr_guard.dp.record_ledger import LedgerReserved
from flwr_guard.keys import NodeConfig
from flwr_guard.node.app_config import LedgerHandout, app_node_config
from flwr_guard.node.enforcement import NodeEnforcement
from flwr_guard.node.frames import MAX_RESULT_BYTES, read_frames, write_frames
from flwr_guard.node.isolation import AppIsolation

__all__ = ["MAX_RESULT_BYTES", "app_node_config", "run_app"]

#: The app's records in ``context.state`` are kept under this prefix; the app sees them
#: without it and never sees the guard's own records (SecAgg+ keys, round state).
APP_STATE_PREFIX = "app:"
APP_FAILED = "flwr-guard node: the app's process failed:"
#: The most characters of an app's own error text that leave the node. An error reply
#: is the one thing the app says to the server that no policy mod checks, so its text is
#: cut to this many printable ASCII characters: enough for a refusal and its numbers, a
#: bounded channel (at most this many bytes per message) for an app that abuses it.
MAX_APP_REASON_CHARS = 400


def app_error_reason(text: str) -> str:
    """An app's error text as it may leave the node: non-printable and non-ASCII
    characters replaced by ``?``, cut to :data:`MAX_APP_REASON_CHARS`."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text[: MAX_APP_REASON_CHARS + 1])
    return clean if len(clean) <= MAX_APP_REASON_CHARS else clean[: MAX_APP_REASON_CHARS - 3] + "..."


def app_state(state: RecordDict) -> RecordDict:
    """The app's records of ``state``, without :data:`APP_STATE_PREFIX`."""
    out = RecordDict()
    for name, record in state.items():
        if name.startswith(APP_STATE_PREFIX):
            out[name[len(APP_STATE_PREFIX):]] = record
    return out


def merge_app_state(state: RecordDict, returned: RecordDict) -> None:
    """Replace the app's records in ``state`` by ``returned`` (the guard's stay as they are)."""
    for name in [n for n in state if n.startswith(APP_STATE_PREFIX)]:
        del state[name]
    for name, record in returned.items():
        state[APP_STATE_PREFIX + name] = record


@dataclass(frozen=True)
class AppResult:
    """What the app's process returned.

    Attributes:
        reply: the reply, its metadata rebuilt from the message it answers.
        exit_code: the child's exit code.
    """

    reply: Message
    exit_code: int


def _failed(message: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{APP_FAILED} {reason}"),
                   reply_to=message)


def run_app(message: Message, context: Context, run: Run, fab: Fab,
            command: Sequence[str] | None = None,
            enforcement: NodeEnforcement | None = None,
            isolation: AppIsolation | None = None) -> AppResult:
    """Run the app's ClientApp on ``message`` in a child process (see the module docstring).

    Args:
        message: the message to answer (its content is the app's input).
        context: the guard's context; its app records are updated in place from the
            child's answer, its other records are never shown to the child.
        run, fab: the run and the FAB (already checked against the allow-list).
        command: the child's argv without the result fd (default: this interpreter,
            ``-m flwr_guard.node.app_child``).
        enforcement: what the node enforces around this message, made known to the
            app's ``ClientGuard`` (``None``: nothing; the app guard enforces SecAgg+ itself).
        isolation: how the child is kept from the guard
            (:class:`~flwr_guard.node.isolation.AppIsolation`, resolved; ``None``:
            ``process``, the child runs as the guard's user).

    Returns:
        The reply (an error reply when the app raised or its process failed, or when the
        node's ledger stayed reserved by another run's app).
    """
    isolation = isolation if isolation is not None else AppIsolation()
    try:
        timeout = app_timeout(context.node_config)
    except ValueError as err:
        return AppResult(_failed(message, str(err)), -1)
    with isolation.app_turn(), isolation.workspace() as space:
        try:
            ledger = LedgerHandout(context.node_config, copy_dir=space.ledger_dir, owner=space.owner,
                                   holder={"run-id": context.run_id})
        except LedgerReserved as err:
            return AppResult(_failed(message, str(err)), -1)
        except OSError as err:  # e.g. a read-only ledger directory: no reservation
            return AppResult(_failed(message, f"cannot reserve the node's record-level ledger "
                                              f"for the app's copy: {err}"), -1)
        argv = list(command or [sys.executable, "-m", "flwr_guard.node.app_child"])
        try:
            result = _run_child(message, context, run, fab, enforcement, ledger,
                                lambda fd: isolation.command([*argv, str(fd)], space),
                                isolation.environment(space), space.home,
                                timeout, isolation.kill_app_user)
        finally:
            try:
                isolation.kill_app_user()  # nothing of the app's uid outlives its turn
            finally:
                refused = ledger.take_back(context.node_id)
    if refused is not None:
        return AppResult(_failed(message, refused), result.exit_code)
    return result


#: The default of node config ``guard-app-timeout`` (seconds).
DEFAULT_APP_TIMEOUT_S = 1800.0


def app_timeout(node_config: Mapping[str, Any]) -> float:
    """Node config ``guard-app-timeout``: the seconds one message's app may run
    (default :data:`DEFAULT_APP_TIMEOUT_S`).

    Raises:
        ValueError: not a finite number > 0 (names the key).
    """
    raw = node_config.get(NodeConfig.GUARD_APP_TIMEOUT, DEFAULT_APP_TIMEOUT_S)
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"node config {NodeConfig.GUARD_APP_TIMEOUT} must be a number of seconds "
                         f"> 0, got {raw!r}")
    return value


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the app's process group (its own session); best effort: under ``user``
    without CAP_KILL the guard cannot signal the app's uid (``kill_app_user`` does)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        try:
            child.kill()
        except OSError:
            pass


def _stop(child: subprocess.Popen[bytes], kill_user: Callable[[], None] | None = None) -> None:
    """Kill the app's process (its group, and every process of the app's uid)."""
    _kill_group(child)
    if kill_user is not None:
        kill_user()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _run_child(message: Message, context: Context, run: Run, fab: Fab,
               enforcement: NodeEnforcement | None, ledger: LedgerHandout,
               argv_for: Callable[[int], list[str]], env: dict[str, str] | None,
               cwd: Path | None, timeout: float = DEFAULT_APP_TIMEOUT_S,
               kill_user: Callable[[], None] | None = None) -> AppResult:
    child_context = Context(
        run_id=context.run_id, node_id=context.node_id,
        node_config={**app_node_config(context.node_config), **ledger.node_config},
        state=app_state(context.state), run_config=dict(context.run_config),
        series_id=context.series_id,
    )
    frames = [
        message.metadata.message_id.encode(),
        message_to_proto(message).SerializeToString(),
        context_to_proto(child_context).SerializeToString(),
        run_to_proto(run).SerializeToString(),
        fab_to_proto(fab).SerializeToString(),
        enforcement.to_bytes() if enforcement is not None else b"",
    ]
    read_fd, write_fd = os.pipe()
    argv = argv_for(write_fd)
    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env, cwd=cwd,
                                 start_new_session=True)
    except OSError as err:
        os.close(read_fd)
        os.close(write_fd)
        return AppResult(_failed(message, f"cannot start {argv[0]}: {err}"), -1)
    os.close(write_fd)
    assert child.stdin is not None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _stop(child, kill_user)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    with os.fdopen(read_fd, "rb") as results:
        try:
            try:
                write_frames(child.stdin, frames)
                child.stdin.close()
            except BrokenPipeError:
                pass
            try:
                status, reply_bytes, state_bytes = read_frames(results, 3)
            except (EOFError, ValueError) as err:
                status = b""
                reason = str(err)
            exit_code = child.wait()
        except BaseException:  # the guard is stopped (SIGTERM, SIGINT): the app goes too
            _stop(child, kill_user)
            raise
        finally:
            timer.cancel()
    if expired.is_set():
        return AppResult(_failed(message, f"the app ran longer than node config "
                                          f"{NodeConfig.GUARD_APP_TIMEOUT} ({timeout:g} s) and was "
                                          f"killed (exit code {exit_code})"), exit_code)
    if status != b"ok":
        if status == b"error":
            reason = reply_bytes.decode("utf-8", "replace")  # cut by the runner
        return AppResult(_failed(message, f"{reason} (exit code {exit_code})"), exit_code)
    try:
        from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

        proto = ProtoMessage()
        proto.ParseFromString(reply_bytes)
        raw = message_from_proto(proto)
        state = ProtoRecordDict()
        state.ParseFromString(state_bytes)
        returned_state = recorddict_from_proto(state)
    except Exception as err:
        return AppResult(_failed(message, f"its answer does not parse: {err}"), exit_code)
    if raw.has_error():
        # A refusal names the node's ledger directory, not the app's copy.
        reply = Message(Error(code=raw.error.code, reason=ledger.reason(raw.error.reason or "")),
                        reply_to=message)
    else:
        reply = Message(raw.content, reply_to=message)
    merge_app_state(context.state, returned_state)
    return AppResult(reply, exit_code)
