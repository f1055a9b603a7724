"""Canonical encoding of SecAgg+ control messages (JSON with base64 for bytes).

Control messages are small (keys, signatures, encrypted shares, node-id lists); the
masked vector itself travels as a NumPy array in an ArrayRecord.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from flwr_guard.errors import FlwrGuardError

_BYTES = "__b64"


class MalformedMessage(FlwrGuardError, ValueError):
    """A control message could not be decoded or lacks a field."""


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _BYTES in obj:
        return base64.b64decode(obj[_BYTES], validate=True)
    return obj


def encode(message: dict[str, Any]) -> bytes:
    """Encode a dict of JSON values and bytes, with sorted keys (deterministic)."""
    return json.dumps(message, default=_default, sort_keys=True, separators=(",", ":")).encode()


def decode(blob: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode`.

    Raises:
        MalformedMessage: if ``blob`` is not such an encoding of a dict.
    """
    try:
        message = json.loads(blob, object_hook=_hook)
    except (ValueError, TypeError) as err:
        raise MalformedMessage(f"undecodable SecAgg+ message: {err}") from err
    if not isinstance(message, dict):
        raise MalformedMessage("SecAgg+ message is not a mapping")
    return message


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``message[name]`` checked to be of ``kind``.

    Raises:
        MalformedMessage: if missing or of another type.
    """
    try:
        value = message[name]
    except KeyError:
        raise MalformedMessage(f"SecAgg+ message lacks {name!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise MalformedMessage(f"SecAgg+ field {name!r} has the wrong type")
    return value
