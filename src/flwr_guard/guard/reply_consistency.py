"""Keep one client's odd reply from ending the run: the consistency filter of
:class:`~flwr_guard.guard.strategy.GuardedStrategy`.

Flower's Message-API strategies (FedAvg and the ones built on it) check that every
reply holds exactly one ArrayRecord and one MetricRecord with the same keys on every
reply and a numeric weight (``flwr.serverapp.strategy.strategy_utils.
validate_message_reply_consistency``), and raise ``InconsistentMessageReplies`` (an
``AppExitException``: the run ends) when one reply differs. So one client adding one
metric key would end everybody's run. :func:`consistent_replies` applies the same
checks per reply *before* the wrapped strategy sees the replies and keeps the largest
group of replies with one layout (record names, array keys, shapes and dtypes, metric
keys and the lengths of list-valued metrics); every other reply is left out with a
logged reason. No Flower import beyond the Message types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

Layout = tuple[Any, ...]


def _layout(msg: Message, weighted_by_key: str, check_arrays: bool) -> Layout:
    """The reply's layout, or raise ``ValueError`` naming what Flower would refuse."""
    content = msg.content
    metrics = content.metric_records
    if len(metrics) != 1:
        raise ValueError(f"{len(metrics)} MetricRecords, exactly one expected")
    (metric_name, record), = metrics.items()
    weight = record.get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or weight < 0:
        raise ValueError(f"the MetricRecord's {weighted_by_key!r} is not a finite number >= 0")
    # Flower averages scalars and lists element-wise (zip): a list of another length than
    # the others' would raise inside its aggregation, so a list's length is layout too.
    layout: Layout = (metric_name, tuple(sorted(
        (key, len(value) if isinstance(value, list) else -1) for key, value in record.items())))
    if check_arrays:
        arrays = content.array_records
        if len(arrays) != 1:
            raise ValueError(f"{len(arrays)} ArrayRecords, exactly one expected")
        (array_name, array_record), = arrays.items()
        layout += (array_name, tuple((key, tuple(a.shape), str(a.dtype))
                                     for key, a in array_record.items()))
    return layout


def consistent_replies(
    replies: Iterable[Message], weighted_by_key: str, check_arrays: bool
) -> tuple[list[Message], dict[int, str]]:
    """The replies a Flower strategy can aggregate together, and why the others are out.

    Args:
        replies: the round's replies (error replies are kept: strategies skip them).
        weighted_by_key: the strategy's weight key (``"num-examples"``).
        check_arrays: train replies (one ArrayRecord of one layout) or evaluate
            replies (metrics only).

    Returns:
        ``(kept, excluded)``: error replies and the largest group of replies of one
        layout (ties: the group holding the smallest sender id), in their order;
        ``{sender node id: reason}`` for the rest.
    """
    replies = list(replies)
    excluded: dict[int, str] = {}
    groups: dict[Layout, list[Message]] = {}
    for msg in replies:
        if msg.has_error():
            continue
        try:
            layout = _layout(msg, weighted_by_key, check_arrays)
        except Exception as err:
            excluded[msg.metadata.src_node_id] = f"reply Flower's strategy cannot aggregate: {err}"
            continue
        groups.setdefault(layout, []).append(msg)
    if not groups:
        return [m for m in replies if m.has_error()], excluded
    best_layout, best = min(groups.items(),
                            key=lambda kv: (-len(kv[1]), min(m.metadata.src_node_id for m in kv[1])))
    for layout, group in groups.items():
        if group is best:
            continue
        differ = sorted(name for name, _ in set(layout[1]) ^ set(best_layout[1]))
        for msg in group:
            excluded[msg.metadata.src_node_id] = (
                f"its records differ from those of {len(best)} other replies "
                f"(e.g. metrics {differ[:5]} differ in name or list length)"
            )
    kept_ids = {id(m) for m in best}
    return [m for m in replies if m.has_error() or id(m) in kept_ids], excluded


__all__ = ["consistent_replies"]
