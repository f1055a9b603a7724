"""Is the SuperLink serving? ``GET /health`` over HTTP or HTTPS (Flower 1.41).

Used by the local launcher while it waits for the SuperLink, and as the health check
of the SuperLink container (``python -m flwr_guard.deployment.healthcheck``), where it
reads the address from the environment:

- ``FLWR_GUARD_HEALTH_URL``: default ``http://127.0.0.1:8000/health``;
- ``FLWR_GUARD_HEALTH_CA``: PEM CA certificate to verify an ``https`` URL with
  (default: the system's trust store).

Exit status 0 when the endpoint answers 2xx, 1 otherwise (Docker's and Kubernetes'
convention for exec probes).
"""

from __future__ import annotations

import os
import ssl
import sys

import httpx

DEFAULT_URL = "http://127.0.0.1:8000/health"


def superlink_healthy(url: str, ca_certfile: str | None = None, timeout: float = 2.0) -> bool:
    """True if ``url`` answers with a 2xx status.

    Args:
        url: the SuperLink's ``/health`` URL, ``http://`` or ``https://``.
        ca_certfile: CA certificate (PEM path) that verifies an ``https`` server; the
            certificate must name the URL's host in its SANs. ``None``: system store.
        timeout: seconds for connecting and reading.
    """
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=ca_certfile) if ca_certfile else True
    )
    try:
        return httpx.get(url, timeout=timeout, verify=verify).is_success
    except httpx.HTTPError:
        return False


def main() -> int:
    url = os.environ.get("FLWR_GUARD_HEALTH_URL", DEFAULT_URL)
    ca = os.environ.get("FLWR_GUARD_HEALTH_CA") or None
    try:
        healthy = superlink_healthy(url, ca)
    except OSError as err:  # unreadable CA file
        print(f"cannot read the CA certificate {ca}: {err}", file=sys.stderr)
        return 1
    if not healthy:
        print(f"SuperLink not healthy at {url}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
