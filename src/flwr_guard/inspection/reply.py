"""Reply inspection: does a reply carry more than the declared update?

A train reply should hold the model update (one ArrayRecord with the model's keys,
shapes and dtypes) and a handful of scalar metrics. Anything beyond that is a channel
for accidental leakage — per-example losses or gradients logged as metrics, an extra
array with a gradient or a batch, a long list whose entries follow the samples. The
inspector reports each such item as a :class:`Finding`; the adapters decide whether to
flag (log) or block (drop) the reply.

Checks (``declared`` = what the server sent: the global model's arrays):

| kind | what |
| --- | --- |
| ``array-records`` | not exactly one ArrayRecord in a train reply / any in an evaluate reply |
| ``undeclared-array`` | an array key the model does not have |
| ``missing-array`` | a model key absent from the reply |
| ``shape-mismatch`` / ``dtype-mismatch`` | an array that is not the model's shape / dtype |
| ``metric-records`` | more than one MetricRecord |
| ``per-example-metric`` | a metric named like per-example data (``per-sample-loss``, ``losses``, ``loss-17``) |
| ``gradient-metric`` | a list-valued metric named like a gradient |
| ``high-cardinality-metric`` | a list longer than ``max_list_length`` |
| ``numbered-metrics`` | more than ``max_numbered_keys`` keys that differ only by a number |
| ``too-many-metrics`` | more than ``max_metric_keys`` metric keys |
| ``config-record`` | a ConfigRecord in the reply (free-form strings / bytes) |

The inputs are plain Python (no Flower types), so this module is testable alone; see
:func:`flwr_guard.records.plain_content` for the conversion.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ArrayShapes = Mapping[str, tuple[tuple[int, ...], str]]

PER_EXAMPLE_PATTERN = (
    r"(per[-_ ]?(example|sample|record|item|instance))"
    r"|((example|sample|instance)[-_ ]?(loss|grad|logit|pred|label|output|embedding)s?)"
    r"|(^|[-_ ])(losses|logits|predictions|embeddings|activations)($|[-_ ])"
    r"|(^|[-_ ])(loss|logit|grad|pred|label)[-_ ]?\d+$"
)
GRADIENT_PATTERN = r"grad(ient)?s?($|[-_ ])"
_NUMBERED = re.compile(r"^(.*?)[-_.]?\d+$")


@dataclass(frozen=True)
class ReplyLimits:
    """Thresholds of the reply inspector.

    Attributes:
        max_list_length: longest list a metric may hold.
        max_metric_keys: most metric keys a reply may hold.
        max_numbered_keys: most keys that share a stem and differ by a trailing number.
        allow_config_records: accept ConfigRecords in replies.
        per_example_pattern, gradient_pattern: regular expressions (case-insensitive)
            on metric keys.
    """

    max_list_length: int = 16
    max_metric_keys: int = 64
    max_numbered_keys: int = 16
    allow_config_records: bool = False
    per_example_pattern: str = PER_EXAMPLE_PATTERN
    gradient_pattern: str = GRADIENT_PATTERN


@dataclass(frozen=True)
class Finding:
    """One thing a reply carries beyond the declared update.

    Attributes:
        kind: the check that fired (see the module's table).
        where: record and key, e.g. ``"metrics/per-sample-loss"``.
        detail: human-readable explanation (never the values themselves).
    """

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}: {self.detail}"


def _check_arrays(
    declared: ArrayShapes | None, arrays: Mapping[str, ArrayShapes]
) -> list[Finding]:
    if declared is None:
        return [
            Finding("array-records", name, "an evaluate/query reply should carry no arrays")
            for name in arrays
        ]
    if len(arrays) != 1:
        return [Finding("array-records", ",".join(arrays) or "-",
                        f"expected exactly one ArrayRecord, found {len(arrays)}")]
    found: list[Finding] = []
    name, record = next(iter(arrays.items()))
    for key, (shape, dtype) in record.items():
        where = f"{name}/{key}"
        if key not in declared:
            found.append(Finding("undeclared-array", where,
                                 f"array of shape {shape} is not a model parameter"))
            continue
        want_shape, want_dtype = declared[key]
        if tuple(shape) != tuple(want_shape):
            found.append(Finding("shape-mismatch", where, f"shape {shape}, model has {want_shape}"))
        if dtype != want_dtype:
            found.append(Finding("dtype-mismatch", where, f"dtype {dtype}, model has {want_dtype}"))
    for key in declared:
        if key not in record:
            found.append(Finding("missing-array", f"{name}/{key}", "model parameter missing"))
    return found


def _check_metrics(
    metrics: Mapping[str, Mapping[str, Any]], limits: ReplyLimits
) -> list[Finding]:
    found: list[Finding] = []
    if len(metrics) > 1:
        found.append(Finding("metric-records", ",".join(metrics),
                             f"expected at most one MetricRecord, found {len(metrics)}"))
    per_example = re.compile(limits.per_example_pattern, re.IGNORECASE)
    gradient = re.compile(limits.gradient_pattern, re.IGNORECASE)
    for name, record in metrics.items():
        if len(record) > limits.max_metric_keys:
            found.append(Finding("too-many-metrics", name,
                                 f"{len(record)} keys > {limits.max_metric_keys}"))
        stems: Counter[str] = Counter()
        for key, value in record.items():
            where = f"{name}/{key}"
            is_list = isinstance(value, (list, tuple))
            if per_example.search(key):
                found.append(Finding("per-example-metric", where,
                                     "name suggests per-example data"))
            elif is_list and gradient.search(key):
                found.append(Finding("gradient-metric", where,
                                     f"list of {len(value)} values named like a gradient"))
            if is_list and len(value) > limits.max_list_length:
                found.append(Finding("high-cardinality-metric", where,
                                     f"list of {len(value)} values > {limits.max_list_length}"))
            match = _NUMBERED.match(key)
            if match:
                stems[match.group(1)] += 1
        for stem, count in stems.items():
            if count > limits.max_numbered_keys:
                found.append(Finding("numbered-metrics", f"{name}/{stem}*",
                                     f"{count} keys differing by a number > "
                                     f"{limits.max_numbered_keys}"))
    return found


def inspect_reply(
    declared: ArrayShapes | None,
    arrays: Mapping[str, ArrayShapes],
    metrics: Mapping[str, Mapping[str, Any]],
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    limits: ReplyLimits | None = None,
) -> list[Finding]:
    """Everything in a reply beyond the declared update.

    Args:
        declared: ``{key: (shape, dtype)}`` of the model the server sent (train), or
            ``None`` when the reply should carry no arrays (evaluate, query).
        arrays: ``{record: {key: (shape, dtype)}}`` of the reply's ArrayRecords.
        metrics: ``{record: {key: value}}`` of the reply's MetricRecords.
        configs: ``{record: {key: value}}`` of the reply's ConfigRecords.
        limits: thresholds (defaults: :class:`ReplyLimits`).

    Returns:
        The findings, empty when the reply carries only the declared update.
    """
    limits = limits or ReplyLimits()
    found = _check_arrays(declared, arrays) + _check_metrics(metrics, limits)
    if configs and not limits.allow_config_records:
        found += [Finding("config-record", name, f"ConfigRecord with {len(rec)} keys")
                  for name, rec in configs.items()]
    return found
