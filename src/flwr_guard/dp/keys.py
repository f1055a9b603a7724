"""The keys DP puts in Flower messages (no Flower imports).

Train config (server -> client), written by :class:`~flwr_guard.dp.strategy.DPFedAvg`,
and reply metrics (client -> server), written by the client side
(:func:`~flwr_guard.dp.mods.update_clipping_mod`,
:func:`~flwr_guard.dp.distributed_client.distributed_dp_noise`).
"""

from __future__ import annotations

# Train config.
KEY_CLIPPING_NORM = "dp-clipping-norm"
KEY_ADAPTIVE = "dp-adaptive-clipping"
KEY_WEIGHT_KEY = "dp-weight-key"
KEY_DISTRIBUTED = "dp-distributed"
KEY_NOISE_MULTIPLIER = "dp-noise-multiplier"
KEY_MIN_CONTRIBUTORS = "dp-min-contributors"
KEY_QUANTIZATION_STEP = "dp-quantization-step"

# Reply metrics (integers, so that SecAgg+ can sum them masked).
KEY_UNCLIPPED = "dp-unclipped-count"  # Andrew et al.'s bit 1[||update|| <= C]
KEY_CLIPPED = "dp-clipped-count"  # 1: this reply went through update_clipping_mod
KEY_NOISED = "dp-noised-count"  # 1: this client added its distributed-DP noise

# Node config: the client's own distributed-DP policy (never the server's).
NODE_MIN_NOISE_MULTIPLIER = "dp-min-noise-multiplier"
NODE_HONEST_CONTRIBUTORS = "dp-honest-contributors"
