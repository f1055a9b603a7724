"""The guard's ClientApp process: what a guarded SuperNode runs for every message.

``python -m flwr_guard.node.runner --runtime-api-address HOST:PORT --token-stdin
--insecure`` takes the place of ``flwr-clientapp`` (the node's SuperExec,
:mod:`flwr_guard.node.superexec`, starts it and writes the task token to its stdin, so
the token never appears in a process list). It speaks Flower 1.41's Runtime API with
Flower's own functions (``pull_task_input``, ``push_message``, ``push_task_output`` of
``flwr.supernode.runtime.run_clientapp``; pinned in :mod:`flwr_guard.node.flower_pins`)
and then, unlike ``flwr-clientapp``, never imports the app:

1. pull the message, the context, the run and the FAB from the SuperNode;
2. read the node's policy from the node config (:class:`~flwr_guard.node.policy.NodePolicy`);
   a policy that does not parse refuses the message, naming the key;
3. check the FAB against the allow-list; a FAB not on it is refused before any of its
   code is installed;
4. refuse message types other than train and evaluate;
5. run the round log (outermost, observing), the policy mods (``ClientGuard``'s chain),
   and innermost the app in a child process (:func:`flwr_guard.node.app_process.run_app`),
   which is only called when the mods let the message through, and is told what the
   node enforces around it (:func:`enforcement_for`: the app's own ``ClientGuard`` then
   leaves SecAgg+ to the node);
6. push the reply and the context (the guard's records and the app's, apart) back.

Every refusal is an error reply whose reason starts with
:data:`~flwr_guard.guard.client_mod.POLICY_REFUSAL` (Flower's strategies log it as the
node's error; ``GuardedStrategy`` counts it as a policy refusal).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

from flwr.app import Context, Message

logger = logging.getLogger("flwr_guard.node")

App = Callable[[Message, Context], Message]


def chain(mods: Sequence[Any], app: App) -> App:
    """``mods`` (outermost first) around ``app``, as Flower's ClientApp chains them."""
    def wrap(inner: App, mod: Any) -> App:
        return lambda msg, ctx: mod(msg, ctx, inner)

    return reduce(wrap, reversed(list(mods)), app)


def without_protocol(message: Message) -> Message:
    """``message`` as the app sees it: without the SecAgg+ protocol record (the node's
    SecAgg+ mod has already checked the model against it)."""
    from copy import copy

    from flwr.app import RecordDict
    from flwr.app.message.message import make_message

    from flwr_guard.secagg.constants import SECAGG_RECORD

    if SECAGG_RECORD not in message.content:
        return message
    content = RecordDict({k: v for k, v in message.content.items() if k != SECAGG_RECORD})
    return make_message(metadata=copy(message.metadata), content=content)


def enforcement_for(message: Message, policy: Any) -> Any:
    """The :class:`~flwr_guard.node.enforcement.NodeEnforcement` of ``message`` as it
    reaches the app (inside the node's mods): masked by the node when it is the SecAgg+
    ``masked-input`` stage (the node's SecAgg+ mod masks the reply)."""
    from flwr_guard.guard.client_mod import MASKED_INPUT_STAGE, SECAGG_RECORD
    from flwr_guard.node.enforcement import NodeEnforcement
    from flwr_guard.secagg.constants import Key

    record = message.content.config_records.get(SECAGG_RECORD)
    # Only a train reply is masked by the node's SecAgg+ mod: an evaluate message that
    # carries a masked-input record is never masked, whatever its record says.
    train = message.metadata.message_type.split(".", 1)[0] == "train"
    masked = train and record is not None and record.get(Key.STAGE) == MASKED_INPUT_STAGE
    return NodeEnforcement(secagg_masked=masked, policy=policy.digest(),
                           inspect_replies=policy.inspect_replies)


def handle(message: Message, context: Context, run: Any, fab: Any,
           app: App | None = None, isolation: Any = None) -> Message:
    """The guard's answer to ``message`` (see the module docstring, steps 2-5).

    Args:
        app: the innermost call (default: the app in a child process); tests give one.
        isolation: the app process's :class:`~flwr_guard.node.isolation.AppIsolation`
            (``None``: ``process``).
    """
    from flwr_guard.guard.client_mod import refusal
    from flwr_guard.node.allowlist import FAB_REFUSAL
    from flwr_guard.node.policy import ANSWERED_TYPES, NodePolicy
    from flwr_guard.node.round_log import round_log_mod

    try:
        policy = NodePolicy.from_node_config(context.node_config)
    except ValueError as err:
        return refusal(message, f"invalid node policy: {err}")
    log_mod = round_log_mod(policy.digest())
    why = policy.allowlist.check(fab.content)
    if why is not None:
        return chain([log_mod], lambda m, c: refusal(m, f"{FAB_REFUSAL} {why}"))(message, context)
    kind = message.metadata.message_type.split(".", 1)[0]
    if kind not in ANSWERED_TYPES:
        return chain([log_mod], lambda m, c: refusal(
            m, f"the node guard answers only {' and '.join(ANSWERED_TYPES)} messages, not "
            f"{message.metadata.message_type!r}"))(message, context)
    if app is None:
        from flwr_guard.node.app_process import run_app

        def app(msg: Message, ctx: Context) -> Message:
            logger.info("flwr-guard node: the app of FAB %s runs in a child process (app isolation %s)",
                        fab.hash_str, isolation.level if isolation is not None else "process")
            return run_app(without_protocol(msg), ctx, run, fab,
                           enforcement=enforcement_for(msg, policy), isolation=isolation).reply

    mods = policy.train_mods() if kind == "train" else policy.other_mods()
    return chain([log_mod, *mods], _bounded_errors(app))(message, context)


def _bounded_errors(app: App) -> App:
    """``app`` whose error replies leave with their text cut
    (:func:`~flwr_guard.node.app_process.app_error_reason`): an error reply passes every
    policy mod unchecked, so its free text would otherwise carry anything to the server."""
    from flwr.app import Error

    from flwr_guard.node.app_process import app_error_reason

    def bounded(msg: Message, ctx: Context) -> Message:
        reply = app(msg, ctx)
        if not reply.has_error():
            return reply
        return Message(Error(code=reply.error.code, reason=app_error_reason(reply.error.reason or "")),
                       reply_to=msg)

    return bounded


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread (as SIGINT raises
    ``KeyboardInterrupt``), so that a guard stopped mid-message still takes the app's
    ledger copy back (its steps are recorded) and removes the app's workspace."""
    import signal

    def _exit(signum: int, frame: Any) -> None:
        del frame
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def run_guarded_clientapp(runtime_api_address: str, token: str, insecure: bool,
                          certificates: bytes | None, parent_pid: int | None,
                          isolation: Any = None) -> int:
    """Serve one task of the SuperNode's Runtime API under the node's guard; exit code."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context = None
    status, details, code = SubStatus.FAILED, "flwr-guard node: the guard failed", 1
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        reply = handle(message, context, run, fab, isolation=isolation)
        push_message(client, reply, context)
        status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as err:
        logger.exception("flwr-guard node: the guard's task failed")
        details = f"flwr-guard node: {type(err).__name__}: {err}"
    finally:
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m flwr_guard.node.runner``: the arguments of ``flwr-clientapp``."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    exit_on_sigterm()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("flwr_guard").addHandler(handler)
    logging.getLogger("flwr_guard").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description="flwr-guard's ClientApp process (node guard)")
    parser.add_argument("--runtime-api-address", default=SUPERNODE_DEFAULT_CLIENT_ADDRESS)
    parser.add_argument("--app-isolation", default="auto",
                        help="how the app's process is kept from the guard (flwr_guard.node.isolation)")
    parser.add_argument("--app-user", default=None, help="the app's USER|UID[:GID]")
    add_args_flwr_app_common(parser=parser, include_token_stdin=True)
    args = parser.parse_args(argv)
    token = try_obtain_flwr_app_token(args)
    from flwr_guard.node.isolation import AppIsolation

    # The SuperExec resolved and checked it at start; resolving again is cheap and keeps
    # a runner started by hand from running an app less isolated than asked.
    isolation = AppIsolation.resolve(args.app_isolation, args.app_user)
    return run_guarded_clientapp(
        args.runtime_api_address, token, args.insecure,
        validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        args.parent_pid, isolation,
    )


if __name__ == "__main__":
    sys.exit(main())
