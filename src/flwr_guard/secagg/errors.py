"""The error a SecAgg+ client raises when it refuses to continue a round."""


class ProtocolError(RuntimeError):
    """The client refuses to continue the round: the server or a peer misbehaved."""
