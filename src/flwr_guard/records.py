"""Small helpers to read Flower messages (adapter side; the core never imports Flower)."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flwr_guard.config_values import number

BLOCK_PREFIX = "flwr-guard"


def message_kind(msg: Message) -> str:
    """``"train"``, ``"evaluate"`` or ``"query"`` (a ``"train.xyz"`` type counts as train)."""
    return msg.metadata.message_type.split(".", 1)[0]


def first_array_record(content: RecordDict) -> ArrayRecord | None:
    """The ``"arrays"`` ArrayRecord if present, else the only one, else ``None``."""
    records = content.array_records
    if "arrays" in records:
        return records["arrays"]
    return next(iter(records.values())) if len(records) == 1 else None


def find_metric_record(content: RecordDict) -> MetricRecord | None:
    """``"metrics"`` if present, else the only MetricRecord, else ``None``."""
    records = content.metric_records
    if "metrics" in records:
        return records["metrics"]
    return next(iter(records.values())) if len(records) == 1 else None


def reply_metric_record(reply: Message) -> MetricRecord:
    """The reply's MetricRecord to extend: ``"metrics"``, else the only one; created as
    ``"metrics"`` when the reply has none.

    Raises:
        ValueError: if the reply holds several MetricRecords and none is ``"metrics"``.
    """
    found = find_metric_record(reply.content)
    if found is not None:
        return found
    if not reply.content.metric_records:
        reply.content["metrics"] = MetricRecord()
        return reply.content.metric_records["metrics"]
    raise ValueError(f"reply holds {len(reply.content.metric_records)} MetricRecords; cannot pick one")


def server_round(msg: Message) -> int:
    """The ``server-round`` that Flower's strategies put into the ConfigRecord, else the
    message's group id when numeric, else 0."""
    for record in msg.content.config_records.values():
        if "server-round" in record:
            return int(number(record["server-round"], "server-round"))
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def array_shapes(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of an ArrayRecord, without deserialising the data."""
    return {key: (tuple(int(d) for d in arr.shape), str(arr.dtype)) for key, arr in record.items()}


def plain_content(content: RecordDict) -> dict[str, dict[str, dict[str, Any]]]:
    """The parts of a RecordDict that the reply inspector reads, as plain Python:
    ``{"arrays": {record: {key: (shape, dtype)}}, "metrics": {record: {key: value}},
    "configs": {record: {key: value}}}``."""
    return {
        "arrays": {name: array_shapes(rec) for name, rec in content.array_records.items()},
        "metrics": {name: dict(rec.items()) for name, rec in content.metric_records.items()},
        "configs": {name: dict(rec.items()) for name, rec in content.config_records.items()},
    }
