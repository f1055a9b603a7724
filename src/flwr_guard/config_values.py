"""Typed reads of the values in Flower's run config, node config and records (no Flower
imports).

Flower types a record value as a union (``int | float | str | bytes | bool`` or a list of
one of them); what the other side sends is under its control. These functions turn a
value into the one type the caller needs, or raise an error that names the key, so that
a wrong type from a misbehaving peer is a clear refusal, never a crash deep inside.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=str)


def choice(value: object, allowed: tuple[T, ...], key: str) -> T:
    """``value`` as one of the ``allowed`` strings.

    Raises:
        ValueError: any other value, naming ``key`` and the allowed values.
    """
    for option in allowed:
        if value == option:
            return option
    raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def number(value: object, key: str) -> float:
    """``value`` as a float (an int, float or bool of a record).

    Raises:
        TypeError: a string, bytes or list, naming ``key``.
    """
    if not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number, got {type(value).__name__}")
    return float(value)


def raw_bytes(value: object, key: str) -> bytes:
    """``value`` as bytes.

    Raises:
        TypeError: anything but bytes, naming ``key``.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"{key} must be bytes, got {type(value).__name__}")
    return value


def sequence(value: object, key: str) -> list[object]:
    """``value`` (a record's list value) as a list.

    Raises:
        TypeError: a scalar, naming ``key``.
    """
    if not isinstance(value, list):
        raise TypeError(f"{key} must be a list, got {type(value).__name__}")
    return list(value)
