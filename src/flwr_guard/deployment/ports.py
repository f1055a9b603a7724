"""TCP ports on the loopback interface."""

from __future__ import annotations

import socket

from flwr_guard.errors import FlwrGuardError


class PortInUseError(FlwrGuardError, OSError):
    """A port that a deployment process needs is already taken."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that the kernel reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise :class:`PortInUseError` if ``host:port`` cannot be bound.

    Raises:
        PortInUseError: with the address in the message.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise PortInUseError(f"{host}:{port} is already in use ({err.strerror})") from err
