"""The error a SecAgg+ client raises when it refuses to continue a round."""

from flwr_guard.errors import FlwrGuardError


class ProtocolError(FlwrGuardError, RuntimeError):
    """The client refuses to continue the round: the server or a peer misbehaved."""
