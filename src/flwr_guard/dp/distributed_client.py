"""The client side of distributed DP: check the server's request, draw the Skellam noise.

Called by SecAgg+'s client mod (``flwr_guard.secagg.mod``) on the masked-input stage,
after ``update_clipping_mod`` has clipped the update and set its weight to 1. No Flower
imports: the train config, node config and reply metrics are plain mappings.

The server is the adversary here: it chooses the noise multiplier ``z`` and the number
``m`` of contributors whose noise the sum is supposed to hold (each client adds the
variance of ``1 / m`` of the target). A server that asks for ``z = 0`` or an ``m`` of
10^6 would receive updates with almost no noise. The client's own policy, from its node
config, bounds both:

- ``dp-min-noise-multiplier`` (float, default
  :data:`~flwr_guard.dp.node_policy.DEFAULT_MIN_NOISE_MULTIPLIER` = 0.5): refuse a round
  that announces distributed DP (``dp-distributed`` or ``dp-noise-multiplier`` in the
  train config) with a ``z`` below it, 0 included (node config
  ``guard-require-dp = "distributed"`` also refuses a round that asks for no distributed
  noise at all);
- ``dp-honest-contributors`` (int, default
  :data:`~flwr_guard.dp.node_policy.DEFAULT_HONEST_CONTRIBUTORS` = 3): the number of
  honest clients whose noise this client assumes the sum will hold; refuse an ``m``
  above it (never above the cohort).

A round that announces no distributed DP at all gets no noise here (the guard's
policy mod refuses it when the node requires DP: ``guard-require-dp``).

It also refuses a quantisation step different from SecAgg+'s own (the server accounts
with it). A refusal raises ``ValueError``: the mod replies with an error and no update
leaves the client.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from flwr_guard.dp.distributed import skellam_noise_for_secagg
from flwr_guard.dp.node_policy import honest_contributors, min_noise_multiplier
from flwr_guard.keys import NodeConfig, ReplyMetrics, TrainConfig

logger = logging.getLogger(__name__)


def distributed_dp_noise(
    config: Mapping[str, Any] | None,
    node_config: Mapping[str, Any],
    *,
    weight: int,
    cohort_size: int,
    update_length: int,
    clipping_range: float,
    quantization_range: int,
    modulus_bits: int,
    metrics: MutableMapping[str, Any],
) -> np.ndarray | None:
    """This client's Skellam noise (int64 ``(update_length,)``), or ``None`` when neither
    the server asks for distributed DP nor the node requires it.

    Args:
        config: the train config (``dp-noise-multiplier``, ``dp-clipping-norm``,
            ``dp-min-contributors``, ``dp-quantization-step``), or ``None``.
        node_config: the node's own policy (see the module docstring).
        weight: the reply's weight (must be 1: one clipped update).
        cohort_size: clients in the SecAgg+ round.
        update_length: quantised coordinates ``d``.
        clipping_range, quantization_range, modulus_bits: SecAgg+'s quantiser ``r``,
            ``L`` and modulus bits; the step is ``2 r / L``.
        metrics: the reply's metrics; ``dp-noised-count`` is set to 1 when noise is added.

    Raises:
        ValueError: a request below the node's floors, weight other than 1, missing
            clipping norm, a step other than SecAgg+'s, or no room in the modulus.
    """
    config = config or {}
    announced = bool(config.get(TrainConfig.DP_DISTRIBUTED, False)) or TrainConfig.DP_NOISE_MULTIPLIER in config
    # A node whose operator requires distributed DP refuses a round without its noise.
    required = str(node_config.get(NodeConfig.GUARD_REQUIRE_DP, "") or "") == "distributed"
    if not announced and not required:
        return None
    try:
        z = float(config.get(TrainConfig.DP_NOISE_MULTIPLIER, 0.0))
    except (TypeError, ValueError):
        raise ValueError(f"distributed DP refused: the train config announces distributed "
                         f"DP without a numeric {TrainConfig.DP_NOISE_MULTIPLIER!r}; no update is sent") from None
    floor = min_noise_multiplier(node_config)
    if not math.isfinite(z) or not z >= floor:
        raise ValueError(
            f"distributed DP refused: the server asks for noise multiplier {z}, below this "
            f"node's floor {NodeConfig.DP_MIN_NOISE_MULTIPLIER}={floor} (node config; library default "
            "0.5); no update is sent"
        )
    if TrainConfig.DP_CLIPPING_NORM not in config:
        raise ValueError(f"distributed DP needs {TrainConfig.DP_CLIPPING_NORM!r} in the train config")
    clipping_norm = float(config[TrainConfig.DP_CLIPPING_NORM])
    if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
        raise ValueError(f"distributed DP: invalid clipping norm {clipping_norm}")
    min_contributors = int(config.get(TrainConfig.DP_MIN_CONTRIBUTORS, cohort_size))
    honest = honest_contributors(node_config)
    if not 1 <= min_contributors <= min(honest, cohort_size):
        raise ValueError(
            f"distributed DP refused: the server scales each client's noise for "
            f"{min_contributors} contributors, but this node assumes at most "
            f"{min(honest, cohort_size)} honest ones ({NodeConfig.DP_HONEST_CONTRIBUTORS}={honest} in "
            f"the node config, library default 3; cohort {cohort_size}); no update is sent"
        )
    if weight != 1:
        raise ValueError(
            f"distributed DP needs weight 1, got {weight}: place update_clipping_mod inside "
            "secaggplus_mod (it clips and sets the weight to 1)"
        )
    if clipping_norm > clipping_range:
        logger.warning("SecAgg+ clipping range %g < DP clipping norm %g: coordinates may be "
                       "clipped", clipping_range, clipping_norm)
    step = 2.0 * clipping_range / quantization_range
    sent_step = config.get(TrainConfig.DP_QUANTIZATION_STEP)
    if sent_step is not None and not math.isclose(float(sent_step), step, rel_tol=1e-9):
        raise ValueError(
            f"distributed DP refused: the server accounts with quantisation step {sent_step}, "
            f"SecAgg+ quantises with {step} (2 * {clipping_range} / {quantization_range})"
        )
    rng = np.random.default_rng(secrets.randbits(128))
    noise, mu = skellam_noise_for_secagg(z, clipping_norm, min_contributors, step,
                                         update_length, rng)
    # The server lifts the sum around n L / 2; keep 6 noise std inside a quarter of
    # the modulus, where its wrap-around detector does not look.
    span = cohort_size * quantization_range / 2 + 6 * math.sqrt(2 * cohort_size * mu)
    if span >= 2 ** (modulus_bits - 2):
        raise ValueError(
            f"the {modulus_bits}-bit modulus has no room for the noise of {cohort_size} "
            "clients: lower the quantisation range"
        )
    metrics[ReplyMetrics.DP_NOISED_COUNT] = 1
    return noise
