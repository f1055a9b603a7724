"""TCP ports on the loopback interface."""

from __future__ import annotations

import random
import socket

from flwr_guard.errors import FlwrGuardError


class PortInUseError(FlwrGuardError, OSError):
    """A port that a deployment process needs is already taken."""


#: Where :func:`free_port` looks first: below the kernel's ephemeral range.
LISTEN_PORTS_FROM = 20000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections
    (``/proc/sys/net/ipv4/ip_local_port_range``; Linux's default where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now, chosen at random below the
    kernel's ephemeral range where it can (an outgoing connection takes its local port
    from that range, so a port chosen there can be taken before the server binds it);
    a port the kernel picks when none is free there."""
    low, _ = ephemeral_range()
    candidates = range(LISTEN_PORTS_FROM, low) if low - LISTEN_PORTS_FROM >= 1000 else range(0)
    rng = random.SystemRandom()
    for _ in range(min(200, len(candidates))):
        port = rng.choice(candidates)
        if _bindable(host, port):
            return port
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
