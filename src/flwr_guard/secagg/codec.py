"""Canonical encoding of SecAgg+ control messages (JSON with base64 for bytes).

Control messages are small (keys, signatures, encrypted shares, node-id lists); the
masked vector itself travels as a NumPy array in an ArrayRecord.

Decoding is bounded before the parse (:func:`decode`, :func:`check_bounds`): C-speed
passes over the raw bytes count the nesting depth and the structural tokens
(``[ { , :``) outside strings and refuse a blob over ``max_depth`` or ``max_items``
before ``json.loads`` runs. So a hostile blob can
neither recurse (``RecursionError``) nor make the decoder build more Python objects than
``max_items``. Long base64 fields are decoded straight from the blob before the JSON
parse (which then sees a short reference), so the parser never holds extra copies of
them; measured in ``benchmarks/secagg_decode.py``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from flwr_guard.errors import FlwrGuardError

_BYTES = "__b64"

MAX_DEPTH = 16
"""Deepest nesting :func:`decode` accepts (the deepest message or stored state is 5)."""

MAX_ITEMS = 2**16
"""Default bound on the structural tokens (``[ { , :`` outside strings) of one blob."""

# A JSON string (the grammar's escapes; unrolled so that a long base64 string is one
# character-class run).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class MalformedMessage(FlwrGuardError, ValueError):
    """A control message could not be decoded, is too deep or too large, or lacks a field."""


# A base64 field as :func:`encode` writes it, long enough to be worth decoding straight
# from the blob (``{"__b64":"`` cannot occur inside a JSON string: its quotes would
# have to be escaped).
_BIG_FIELD = re.compile(rb'\{"__b64":"([A-Za-z0-9+/]{4096,}={0,2})"\}')
_REF = "__b64ref"


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _hook(big: list[bytes]) -> Callable[[dict[str, Any]], Any]:
    """The object hook of one decode: a bytes field (short: decoded here; long: taken
    out of the blob before the parse, see :func:`_extract_big_fields`)."""

    def hook(obj: dict[str, Any]) -> Any:
        if len(obj) != 1:
            return obj
        if _BYTES in obj:
            text = obj[_BYTES]
            if not isinstance(text, str):
                raise MalformedMessage("a bytes field is not a base64 string")
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as err:
                raise MalformedMessage(f"undecodable base64 field: {err}") from None
        if _REF in obj and big:
            index = obj[_REF]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(big):
                raise MalformedMessage("a reference to a bytes field that does not exist")
            return big[index]
        return obj

    return hook


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


def check_bounds(blob: bytes, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Refuse ``blob`` if its JSON nesting exceeds ``max_depth`` or it holds more than
    ``max_items`` structural tokens (``[ { , :`` outside strings), before any parse.

    C-speed passes: ``bytes.count`` counts the tokens (inside strings too: an
    over-count), then a regular expression blanks the strings and NumPy takes the
    depth over the brackets alone; the copies are freed before the parse. Over-counts
    (never under-counts) what ``json.loads`` would build.

    Raises:
        MalformedMessage: too deep or too many items.
    """
    # Tokens inside strings counted too: an over-count (no legitimate string holds
    # them), and no copy of the blob before the count is known to be small.
    items = sum(blob.count(token) for token in (b",", b":", b"[", b"{"))
    if items > max_items:
        raise MalformedMessage(f"SecAgg+ message holds more than {max_items} items")
    bare = _STRING.sub(b'""', blob)
    brackets = np.frombuffer(bare.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    del bare
    if brackets.size:
        steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int32)
        if int(np.cumsum(steps, dtype=np.int32).max()) > max_depth:
            raise MalformedMessage(f"SecAgg+ message nested deeper than {max_depth}")


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
        message = json.loads(blob, object_hook=_hook(big))
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
