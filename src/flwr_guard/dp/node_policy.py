"""The node operator's DP policy: library defaults, node-config keys, floors (no Flower).

The run config (and the ClientApp's code) come from the server side; the node config is
the operator's. Every DP floor below has a finite library default, so a node with an
empty node config is safe; the node config may set any of them, the run config and the
app's own ``ClientGuard`` may only ask for more (a larger noise multiplier, a smaller
budget), never for less. docs/privacy.md ("Defaults") lists each value and why.

One node-config key per meaning (:class:`flwr_guard.keys.NodeConfig`; default in brackets):

- ``dp-min-noise-multiplier`` [0.5]: user-level floor on ``z``, central and distributed
  DP (``guard-min-noise-multiplier`` is a deprecated alias; the larger of the two wins);
- ``dp-honest-contributors`` [3]: at most this many clients' noise is assumed to reach
  the sum (distributed DP);
- ``dp-sgd-min-noise-multiplier`` [0.5]: record-level floor on DP-SGD's ``z``;
- ``dp-sgd-max-epsilon`` [10.0]: record-level budget cap (never unbounded);
- ``dp-sgd-ledger`` [``$FLWR_HOME/flwr-guard/dp-sgd-ledger``]: the ledgers' directory;
- ``dp-sgd-data-source`` [``partition-<partition-id>``, else ``default``]: the id of
  the ledger, i.e. of the data source it accounts for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from flwr_guard.keys import NodeConfig

logger = logging.getLogger(__name__)

#: Record-level (DP-SGD) budget a node enforces when its node config sets none: the
#: upper end of what Ponomareva et al. 2023 ("How to DP-fy ML", §5.2) still call a
#: reasonable guarantee (epsilon <= 10).
DEFAULT_MAX_EPSILON = 10.0
#: User-level floor on z (central and distributed DP): at z = 0.5 one round without
#: sampling amplification already costs epsilon ~ 10.0 at delta = 1e-5 (PLD,
#: dp-accounting), i.e. the whole default budget.
DEFAULT_MIN_NOISE_MULTIPLIER = 0.5
#: Record-level floor on DP-SGD's z: below ~0.5 the subsampled Gaussian's RDP is barely
#: amplified (dp-accounting's series fails to converge at low orders for q = 0.1) and
#: one epoch at q = 0.01 already costs epsilon ~ 8 at delta = 1e-5.
DEFAULT_DPSGD_MIN_NOISE_MULTIPLIER = 0.5
#: Distributed DP: the number of clients whose noise a node assumes reaches the sum
#: when its node config says nothing. SecAgg+'s own default cohort floor
#: (``secagg-min-cohort`` = 3, :class:`flwr_guard.secagg.policy.SecAggPolicy`): the
#: only cohort size a node is guaranteed without a roster; a server may fill the rest
#: of a larger cohort with clients it runs itself.
DEFAULT_HONEST_CONTRIBUTORS = 3
#: The ledger of a node whose node config declares no data source (and no partition).
DEFAULT_DATA_SOURCE = "default"


def _number(node_config: Mapping[str, Any], key: str) -> float | None:
    """The node config's number under ``key`` (``None`` when absent or 0)."""
    if key not in node_config:
        return None
    value = node_config[key]
    if isinstance(value, bool):
        raise ValueError(f"node config {key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config {key} must be a number, got {value!r}") from None
    if math.isnan(number) or number < 0:
        raise ValueError(f"node config {key} must be a number >= 0, got {value!r}")
    return number or None


def min_noise_multiplier(node_config: Mapping[str, Any]) -> float:
    """The node's user-level floor on ``z`` (central and distributed DP).

    ``dp-min-noise-multiplier``, else :data:`DEFAULT_MIN_NOISE_MULTIPLIER`; the
    deprecated ``guard-min-noise-multiplier`` is still read (a warning names the new
    key) and the larger of the two wins. An explicit value may be lower than the
    default (an operator's decision), never 0.

    Raises:
        ValueError: a value that is not a number >= 0, naming the key.
    """
    value = _number(node_config, NodeConfig.DP_MIN_NOISE_MULTIPLIER)
    alias = _number(node_config, NodeConfig.GUARD_MIN_NOISE_MULTIPLIER)
    if alias is not None:
        logger.warning("node config %s is deprecated: use %s (the larger of the two is "
                       "enforced)", NodeConfig.GUARD_MIN_NOISE_MULTIPLIER, NodeConfig.DP_MIN_NOISE_MULTIPLIER)
        value = alias if value is None else max(value, alias)
    return DEFAULT_MIN_NOISE_MULTIPLIER if value is None else value


def dpsgd_min_noise_multiplier(node_config: Mapping[str, Any]) -> float:
    """``dp-sgd-min-noise-multiplier``, else :data:`DEFAULT_DPSGD_MIN_NOISE_MULTIPLIER`."""
    value = _number(node_config, NodeConfig.DP_SGD_MIN_NOISE_MULTIPLIER)
    return DEFAULT_DPSGD_MIN_NOISE_MULTIPLIER if value is None else value


def dpsgd_max_epsilon(node_config: Mapping[str, Any]) -> float:
    """``dp-sgd-max-epsilon``, else :data:`DEFAULT_MAX_EPSILON` (always finite: an
    unbounded record-level budget cannot be configured)."""
    value = _number(node_config, NodeConfig.DP_SGD_MAX_EPSILON)
    if value is not None and not math.isfinite(value):
        raise ValueError(f"node config {NodeConfig.DP_SGD_MAX_EPSILON} must be finite, got {value}")
    return DEFAULT_MAX_EPSILON if value is None else value


def honest_contributors(node_config: Mapping[str, Any]) -> int:
    """``dp-honest-contributors``, else :data:`DEFAULT_HONEST_CONTRIBUTORS`."""
    value = _number(node_config, NodeConfig.DP_HONEST_CONTRIBUTORS)
    if value is None:
        return DEFAULT_HONEST_CONTRIBUTORS
    if value != int(value):
        raise ValueError(f"node config {NodeConfig.DP_HONEST_CONTRIBUTORS} must be an integer, got {value}")
    return int(value)


def data_source(node_config: Mapping[str, Any]) -> str:
    """The id of the node's record-level ledger: ``dp-sgd-data-source``, else
    ``partition-<partition-id>`` when the node config names its partition, else
    :data:`DEFAULT_DATA_SOURCE`. Only node config counts: nothing the run config sets
    (seed, partitioner, fractions...) changes which ledger the node's records spend."""
    source = str(node_config.get(NodeConfig.DP_SGD_DATA_SOURCE, "") or "")
    if source:
        return source
    if NodeConfig.PARTITION_ID in node_config:
        return f"partition-{node_config[NodeConfig.PARTITION_ID]}"
    return DEFAULT_DATA_SOURCE


def enforced_policy(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """Every DP floor the node enforces, defaults filled in (JSON-serialisable).

    Raises:
        ValueError: a malformed node-config value, naming the key.
    """
    return {
        NodeConfig.DP_MIN_NOISE_MULTIPLIER: min_noise_multiplier(node_config),
        NodeConfig.DP_HONEST_CONTRIBUTORS: honest_contributors(node_config),
        NodeConfig.DP_SGD_MIN_NOISE_MULTIPLIER: dpsgd_min_noise_multiplier(node_config),
        NodeConfig.DP_SGD_MAX_EPSILON: dpsgd_max_epsilon(node_config),
        NodeConfig.DP_SGD_SECURE_MODE: flag(node_config.get(NodeConfig.DP_SGD_SECURE_MODE, False)),
        NodeConfig.DP_SGD_DATA_SOURCE: data_source(node_config),
    }


def policy_digest(node_config: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 16 digits) of :func:`enforced_policy`'s canonical JSON: one
    short token a node logs per round so that an operator sees which floors were in force.
    """
    canonical = json.dumps(enforced_policy(node_config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"flwr-guard/dp-node-policy/v1" + canonical.encode()).hexdigest()[:16]


def flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
