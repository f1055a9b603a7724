"""Deprecated shim: DP's keys live in :mod:`flwr_guard.keys` (``TrainConfig``,
``ReplyMetrics``, ``NodeConfig``).

Kept only because ``flwr_guard/secagg/mod.py`` still imports ``KEY_MIN_CONTRIBUTORS``
from here; delete this file once it imports ``TrainConfig.DP_MIN_CONTRIBUTORS``.
"""

from __future__ import annotations

from flwr_guard.keys import TrainConfig

KEY_MIN_CONTRIBUTORS = TrainConfig.DP_MIN_CONTRIBUTORS
