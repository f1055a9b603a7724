"""What the node guard enforces outside the app, as the app's own process learns it.

Core (no Flower imports, nothing of the guard's policy). Under the node guard the
node's policy mods run outermost in the guard's process (SecAgg+ masking, clipping and
noise floors, reply inspection) and the app runs innermost in a child process
(:mod:`flwr_guard.node.app_process`). An app that wraps itself in flwr-guard's own
``ClientGuard`` would then refuse itself: it sees a plain train message (the node's
SecAgg+ mod has taken the protocol record) and would send its update in the clear to
the guard, which masks it. :class:`NodeEnforcement` tells the app's ``policy_mod`` that
the node masks *this* message's reply, so the app guard steps aside for SecAgg+ only;
its other checks (the server's manifest and DP floors against the app's policy,
record-level DP-SGD, the app's audit and reply inspection) run as before.

Where the marker comes from, and why a server cannot set it: the guard writes it as a
frame on the child's stdin pipe, next to the message
(:func:`flwr_guard.node.app_process.run_app`); ``python -m flwr_guard.node.app_child``
reads it and calls :func:`_set_for_this_process` before it loads the app. Nothing else
sets it: not the run config, not the node config, not the message's content, not an
environment variable. On a node without the guard the app runs in Flower's
``flwr-clientapp``, :func:`node_enforcement` returns ``None``, and the app guard
enforces SecAgg+ itself. (An app whose own code sets the marker is a submitter who could
as well leave the guard out: that adversary is the node guard's, not the app guard's.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

#: The frame's format version (the guard and the child come from one installation).
VERSION = 1


@dataclass(frozen=True)
class NodeEnforcement:
    """What the node guard does around the app for one message.

    Attributes:
        secagg_masked: the message reached the node as a SecAgg+ ``masked-input`` stage
            and the node's SecAgg+ mod masks the app's reply (with distributed noise
            when the server announced it, under the node's floors).
        policy: the node policy's digest (:meth:`flwr_guard.node.policy.NodePolicy.digest`).
        inspect_replies: the node's reply inspector checks the reply.
    """

    secagg_masked: bool
    policy: str
    inspect_replies: bool = True

    def to_bytes(self) -> bytes:
        """The frame the guard writes (UTF-8 JSON)."""
        return json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeEnforcement | None:
        """Parse a frame; ``b""`` means none.

        Raises:
            ValueError: a frame that is not this version's JSON object.
        """
        if not data:
            return None
        try:
            obj = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"the node guard's enforcement frame does not parse: {err}") from err
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError(f"the node guard's enforcement frame is not version {VERSION}")
        if not (isinstance(obj.get("secagg_masked"), bool) and isinstance(obj.get("policy"), str)
                and isinstance(obj.get("inspect_replies"), bool)):
            raise ValueError("the node guard's enforcement frame lacks secagg_masked, policy or "
                             "inspect_replies")
        return cls(obj["secagg_masked"], obj["policy"], obj["inspect_replies"])


_CURRENT: list[NodeEnforcement] = []


def _set_for_this_process(enforcement: NodeEnforcement | None) -> None:
    """Called by :mod:`flwr_guard.node.app_child` only, before the app is loaded."""
    _CURRENT.clear()
    if enforcement is not None:
        _CURRENT.append(enforcement)


def node_enforcement() -> NodeEnforcement | None:
    """What the node guard enforces around this process's app; ``None`` when the app
    does not run under the node guard (see the module docstring)."""
    return _CURRENT[0] if _CURRENT else None
