"""Canonical encoding of SecAgg+ control messages (JSON with base64 for bytes).

Control messages are small (keys, signatures, encrypted shares, node-id lists); the
masked vector itself travels as a NumPy array in an ArrayRecord.

Decoding is bounded before anything is allocated (:func:`decode`): a linear scan of the
raw bytes (regular expressions of the standard library, C speed, no copy) counts the
nesting depth and the structural tokens (``[ { , :``) outside strings and refuses a blob
over ``max_depth`` or ``max_items`` before ``json.loads`` runs. So a hostile blob can
neither recurse (``RecursionError``) nor make the decoder build more Python objects than
``max_items``; base64 fields are decoded after the JSON parse has released its copy of
the document, which keeps the peak at about twice the blob's size (measured in
``benchmarks/secagg_decode.py``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

_BYTES = "__b64"

MAX_DEPTH = 16
"""Deepest nesting :func:`decode` accepts (the deepest message or stored state is 5)."""

MAX_ITEMS = 2**16
"""Default bound on the structural tokens (``[ { , :`` outside strings) of one blob."""

# A JSON string (the grammar's escapes; unrolled so that a long base64 string is one
# character-class run), or one structural character.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)


class MalformedMessage(ValueError):
    """A control message could not be decoded, is too deep or too large, or lacks a field."""


class _Bytes(str):
    """A base64 field, decoded after the JSON parse (see :func:`decode`)."""

    __slots__ = ()


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _BYTES in obj:
        text = obj[_BYTES]
        if not isinstance(text, str):
            raise MalformedMessage("a bytes field is not a base64 string")
        return _Bytes(text)
    return obj


def _unwrap(value: Any) -> Any:
    """Replace every :class:`_Bytes` by its decoded bytes, in place (depth <= MAX_DEPTH)."""
    if isinstance(value, _Bytes):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise MalformedMessage(f"undecodable base64 field: {err}") from None
    if isinstance(value, dict):
        for key in value:
            value[key] = _unwrap(value[key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = _unwrap(item)
    return value


def check_bounds(blob: bytes, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Refuse ``blob`` if its JSON nesting exceeds ``max_depth`` or it holds more than
    ``max_items`` structural tokens (``[ { , :`` outside strings), before any parse.

    One pass over the bytes, stopped at the first excess; allocates nothing of the
    blob's size. Over-counts (never under-counts) what ``json.loads`` would build.

    Raises:
        MalformedMessage: too deep or too many items.
    """
    depth = items = 0
    for match in _TOKEN.finditer(blob):
        token = match.group()
        if token[:1] == b'"':
            continue
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise MalformedMessage(f"SecAgg+ message nested deeper than {max_depth}")
        elif token in (b"]", b"}"):
            depth -= 1
            continue
        items += 1
        if items > max_items:
            raise MalformedMessage(f"SecAgg+ message holds more than {max_items} items")


def encode(message: dict[str, Any]) -> bytes:
    """Encode a dict of JSON values and bytes, with sorted keys (deterministic)."""
    return json.dumps(message, default=_default, sort_keys=True, separators=(",", ":")).encode()


def decode(blob: bytes, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> dict[str, Any]:
    """Inverse of :func:`encode`, bounded (see the module docstring).

    Args:
        blob: the encoded message (the caller bounds its length).
        max_depth: deepest nesting accepted.
        max_items: most structural tokens accepted (about the number of JSON values).

    Raises:
        MalformedMessage: if ``blob`` is not bytes, exceeds a bound, or is not such an
            encoding of a dict.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise MalformedMessage(f"SecAgg+ message of type {type(blob).__name__}, not bytes")
    check_bounds(bytes(blob), max_depth, max_items)
    try:
        message = _unwrap(json.loads(blob, object_hook=_hook))
    except MalformedMessage:
        raise
    except (ValueError, TypeError, RecursionError, UnicodeError) as err:
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
