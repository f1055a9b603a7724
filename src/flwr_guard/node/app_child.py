"""The app's side of :mod:`flwr_guard.node.app_process`: ``python -m flwr_guard.node.app_child FD``.

Reads the message, the app's context, the run, the FAB and what the node enforces
around the app (:class:`~flwr_guard.node.enforcement.NodeEnforcement`, which it makes
known to the app's own ``ClientGuard`` before the app is loaded) from stdin; installs the FAB
and loads its ClientApp with Flower's own functions (as ``flwr-clientapp`` does,
Flower 1.41 ``flwr.supernode.runtime.run_clientapp``); calls it; writes ``ok``, the
reply and the app's state to file descriptor ``FD``, or ``error`` and the reason. An
exception of the app becomes an error reply (as in Flower), not a crash. This module
imports nothing of the guard's policy, keys or DP state.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    result_fd = int(args[0])
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import (
        context_from_proto,
        fab_from_proto,
        message_from_proto,
        message_to_proto,
        recorddict_to_proto,
        run_from_proto,
    )
    from flwr.proto.fab_pb2 import Fab as ProtoFab  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
    from flwr.proto.run_pb2 import Run as ProtoRun  # pylint: disable=E0611

    from flwr_guard.node.enforcement import NodeEnforcement, _set_for_this_process
    from flwr_guard.node.frames import read_frames, write_frames

    with os.fdopen(result_fd, "wb") as out:
        try:
            message_id, message_b, context_b, run_b, fab_b, enforced_b = read_frames(sys.stdin.buffer, 6)
            _set_for_this_process(NodeEnforcement.from_bytes(enforced_b))
            parsed = []
            for cls, data in ((ProtoMessage, message_b), (ProtoContext, context_b),
                              (ProtoRun, run_b), (ProtoFab, fab_b)):
                proto = cls()
                proto.ParseFromString(data)
                parsed.append(proto)
            message = message_from_proto(parsed[0])
            message.metadata.__dict__["_message_id"] = message_id.decode()
            context = context_from_proto(parsed[1])
            run = run_from_proto(parsed[2])
            fab = fab_from_proto(parsed[3])
            from flwr.supercore.task_identity import TaskIdentity

            TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id

            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            client_app = load(run.fab_id, run.fab_version, fab.hash_str)
        except Exception as err:
            write_frames(out, [b"error", f"{type(err).__name__}: {err}".encode(), b""])
            return 1
        try:
            reply = client_app(message=message, context=context)
        except Exception as ex:
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                            reply_to=message)
        write_frames(out, [b"ok", message_to_proto(reply).SerializeToString(),
                           recorddict_to_proto(context.state).SerializeToString()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
