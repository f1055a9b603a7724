"""Flower adapter: the client train mod that clips the update (user-level DP-FedAvg).

``update_clipping_mod`` goes in ``@app.train(mods=[...])`` *inside* (after, in the list)
a SecAgg+ mod: mods run outermost-first on the way in and innermost-first on the way
out, so the reply is clipped before it is masked::

    @app.train(mods=[secaggplus_mod, update_clipping_mod])

On the way in it keeps the global arrays of the train message; on the way out it
computes ``update = reply arrays - global arrays``, clips the update to the clipping norm
``C`` that :class:`~flwr_guard.dp.strategy.DPFedAvg` sent in the train config
(``dp-clipping-norm``), and replaces the reply's arrays by ``global + clipped update``
(same keys, shapes and dtypes). The reply keeps FedAvg's contract — one ArrayRecord and
one MetricRecord with the same keys on every reply — with two changes to the metrics:

- the weight the strategy averages by (``dp-weight-key`` in the config, FedAvg's
  ``weighted_by_key``, ``num-examples`` by default) is set to 1.0: under user-level DP
  every client counts once (uniform mean), which is also what SecAgg+ then sums, so the
  aggregate's weight is the number of clients in it;
- ``dp-clipped-count = 1`` proves the reply went through this mod: with SecAgg+ it is
  summed masked (``masked_metrics=DPFedAvg.MASKED_METRICS``) and ``DPFedAvg`` refuses a
  round whose sum differs from the number of contributors;
- ``dp-noised-count = 0``, a placeholder that SecAgg+'s mod sets to 1 when it adds the
  distributed-DP noise (the server checks the sum the same way);
- ``dp-unclipped-count`` is Andrew et al.'s bit ``1[||update|| <= C]`` under adaptive
  clipping (0 otherwise), a statistic of the client's data: with SecAgg+ it travels
  masked, so only the survivors' sum reaches the server, which centres it.

The update's norm itself is never reported. The clipping core is
:mod:`flwr_guard.dp.clipping`.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode

from flwr_guard.config_values import number
from flwr_guard.dp.clipping import clip_update
from flwr_guard.keys import ReplyMetrics, TrainConfig
from flwr_guard.update import model_update


def _error(msg: Message, reason: str) -> Message:
    log(WARNING, "update_clipping_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def update_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the reply's model update to the clipping norm the server sent (train only).

    Messages other than train messages pass through untouched. A train message without
    ``dp-clipping-norm``, or a reply whose arrays do not match the global arrays (keys,
    shapes, floating-point dtypes, finite values), gets an error reply that says why —
    nothing unclipped leaves the client.
    """
    if msg.metadata.message_type.split(".", 1)[0] != "train":  # also "train.<action>"
        return call_next(msg, context)
    # Other mods may add ConfigRecords of their own (SecAgg+ does): use the one that
    # carries the clipping norm.
    configs = [c for c in msg.content.config_records.values() if TrainConfig.DP_CLIPPING_NORM in c]
    if not configs:
        return _error(
            msg,
            f"the train config has no '{TrainConfig.DP_CLIPPING_NORM}': wrap the server strategy "
            "with flwr_guard.dp.DPFedAvg",
        )
    if len(msg.content.array_records) != 1 or len(configs) != 1:
        return _error(msg, "the train message must hold one ArrayRecord and one DP config")
    config = configs[0]
    clipping_norm = number(config[TrainConfig.DP_CLIPPING_NORM], TrainConfig.DP_CLIPPING_NORM)
    adaptive = bool(config.get(TrainConfig.DP_ADAPTIVE_CLIPPING, False))
    weight_key = str(config.get(TrainConfig.DP_WEIGHT_KEY, ""))
    incoming = next(iter(msg.content.array_records.values()))
    keys = list(incoming.keys())
    global_arrays = [np.array(a, copy=True) for a in incoming.to_numpy_ndarrays()]

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if len(reply.content.array_records) != 1 or len(reply.content.metric_records) > 1:
        return _error(msg, "the reply must hold one ArrayRecord and at most one MetricRecord")
    name, record = next(iter(reply.content.array_records.items()))
    local = record.to_numpy_ndarrays()
    try:
        update = model_update(dict(zip(record.keys(), local, strict=True)),
                              dict(zip(keys, global_arrays, strict=True)))
        clipped, _, unclipped = clip_update(list(update.values()), clipping_norm)
    except ValueError as err:  # other names or shapes, non-float arrays, NaN/inf, bad norm
        return _error(msg, f"cannot clip the update: {err}")
    reply.content[name] = ArrayRecord(
        {
            k: Array(np.asarray(g + u).astype(a.dtype))
            for k, g, u, a in zip(keys, global_arrays, clipped, local, strict=True)
        }
    )
    if reply.content.metric_records:
        metrics_name, metrics = next(iter(reply.content.metric_records.items()))
    else:
        metrics_name, metrics = "metrics", MetricRecord()
    if weight_key:
        metrics[weight_key] = 1.0
    metrics[ReplyMetrics.DP_CLIPPED_COUNT] = 1  # summed masked by SecAgg+: must equal the contributors
    # Placeholder: SecAgg+'s mod sets it to 1 when it adds the distributed-DP noise.
    metrics[ReplyMetrics.DP_NOISED_COUNT] = 0
    # Andrew et al.'s bit (an integer, so SecAgg+ can sum it masked); the server
    # centres the sum (b - 1/2 each) before noising it.
    metrics[ReplyMetrics.DP_UNCLIPPED_COUNT] = 1 if (adaptive and unclipped) else 0
    reply.content[metrics_name] = metrics
    return reply
