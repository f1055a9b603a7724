"""Canonical encoding of SecAgg+ control messages (JSON with base64 for bytes).

Control messages are small (keys, signatures, encrypted shares, node-id lists); the
masked vector itself travels as a NumPy array in an ArrayRecord.

Decoding is bounded before anything is allocated (:func:`decode`): a linear scan of the
raw bytes (regular expressions of the standard library, C speed, no copy) counts the
nesting depth and the structural tokens (``[ { , :``) outside strings and refuses a blob
over ``max_depth`` or ``max_items`` before ``json.loads`` runs. So a hostile blob can
neither recurse (``RecursionError``) nor make the decoder build more Python objects than
``max_items``. Long base64 fields are decoded straight from the blob before the JSON
parse (which then sees a short reference), short ones after the parse has released its
copy of the document; measured in ``benchmarks/secagg_decode.py``.
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


# A base64 field as :func:`encode` writes it, long enough to be worth decoding straight
# from the blob (``{"__b64":"`` cannot occur inside a JSON string: its quotes would
# have to be escaped).
_BIG_FIELD = re.compile(rb'\{"__b64":"([A-Za-z0-9+/]{4096,}={0,2})"\}')
_REF = "__b64ref"


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


def _extract_big_fields(blob: bytes) -> tuple[bytes, list[bytes]]:
    """``blob`` with each long base64 field replaced by ``{"__b64ref": i}``, and the
    fields decoded straight from the blob (a memoryview: no copy of the text), so the
    JSON parse never holds a second and third copy of a large field."""
    fields: list[bytes] = []
    pieces: list[bytes] = []
    view, pos = memoryview(blob), 0
    for match in _BIG_FIELD.finditer(blob):
        try:
            # (binascii reads the memoryview in place; base64.b64decode would copy it)
            fields.append(binascii.a2b_base64(view[match.start(1):match.end(1)], strict_mode=True))
        except (binascii.Error, ValueError) as err:
            raise MalformedMessage(f"undecodable base64 field: {err}") from None
        pieces += [blob[pos:match.start()], b'{"%s":%d}' % (_REF.encode(), len(fields) - 1)]
        pos = match.end()
    if not fields:
        return blob, fields
    pieces.append(blob[pos:])
    return b"".join(pieces), fields


def _unwrap(value: Any, big: list[bytes]) -> Any:
    """Replace every :class:`_Bytes` by its decoded bytes and every reference to a large
    field by that field, in place (depth <= MAX_DEPTH)."""
    if isinstance(value, dict) and len(value) == 1 and _REF in value and big:
        index = value[_REF]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(big):
            raise MalformedMessage("a reference to a bytes field that does not exist")
        return big[index]
    if isinstance(value, _Bytes):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise MalformedMessage(f"undecodable base64 field: {err}") from None
    if isinstance(value, dict):
        for key in value:
            value[key] = _unwrap(value[key], big)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = _unwrap(item, big)
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
    blob = bytes(blob)
    check_bounds(blob, max_depth, max_items)
    blob, big = _extract_big_fields(blob)
    try:
        message = _unwrap(json.loads(blob, object_hook=_hook), big)
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
