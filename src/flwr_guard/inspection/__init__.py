"""Reply and endpoint inspection: nothing beyond the declared update leaves a client,
and no service or metrics exporter exposes gradients or per-example data.

Core (no Flower imports): the reply inspector (:mod:`reply`: :func:`inspect_reply`,
:class:`ReplyLimits`, :class:`Finding`) and the endpoint audit (:mod:`endpoints`,
read-only HTTP GETs; ``flwr-guard audit-endpoints``, :mod:`cli`).

Flower adapters: :func:`reply_inspection_mod` (client mod: blocks or flags a reply
before it leaves the device) and :class:`ReplyGuard` (strategy wrapper: drops such
replies before the wrapped strategy aggregates them). See docs/audit.md, "Reply and
endpoint inspection".
"""

from __future__ import annotations

from flwr_guard.lazy import lazy_getattr

# Every name loads on first use (PEP 562), as in flwr_guard.audit: a ClientApp process
# that only inspects a reply does not import the rest.
_EXPORTS = {
    "Finding": "flwr_guard.inspection.reply",
    "ReplyLimits": "flwr_guard.inspection.reply",
    "inspect_reply": "flwr_guard.inspection.reply",
    "EndpointFinding": "flwr_guard.inspection.endpoints",
    "audit_endpoints": "flwr_guard.inspection.endpoints",
    "reply_inspection_mod": "flwr_guard.inspection.reply_mod",
    "ReplyGuard": "flwr_guard.inspection.reply_guard",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
