"""What one SecAgg+ round is bound to: run, round, cohort, parameters, vector length.

Every signature and every key derivation of the round includes :meth:`digest`, so a
message from another run, round or cohort, or under other parameters, never
verifies, and a mask derived for one round never cancels in another.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr_guard.secagg.crypto import transcript
from flwr_guard.secagg.params import SecAggParams


def ids_bytes(node_ids: Iterable[int]) -> bytes:
    """Canonical encoding of a set of node ids: sorted big-endian uint64."""
    return b"".join(struct.pack(">Q", i) for i in sorted(set(node_ids)))


@dataclass(frozen=True)
class RoundContext:
    """The public facts of one SecAgg+ round, identical for every client.

    Attributes:
        run_id: Flower run id.
        server_round: the round number.
        cohort: ids of the sampled nodes (sorted).
        params: the round's :class:`SecAggParams`.
        vector_length: d + m + 1, the number of integers each client masks: the
            weighted update (d), the ``masked_metrics`` (m) and the weight.
        model_hash: SHA-256 of the global model the server sends (see
            :func:`flwr_guard.secagg.model_hash`); each client checks the model it
            receives against it.
        masked_metrics: names of integer client metrics (counts, bits) that travel
            masked and are revealed only as their sum over the survivors, e.g. the
            clipped-count bit of adaptive clipping.
        multi_round: the context of a multi-round session's set-up
            (:mod:`flwr_guard.secagg.session_client`): keys set up once, masks per round. Bound
            into the digest, so a set-up for one protocol never verifies for the other.
    """

    run_id: int
    server_round: int
    cohort: tuple[int, ...]
    params: SecAggParams
    vector_length: int
    model_hash: bytes
    masked_metrics: tuple[str, ...] = ()
    multi_round: bool = False

    @property
    def update_length(self) -> int:
        """d, the number of model values in the masked vector."""
        return self.vector_length - 1 - len(self.masked_metrics)

    def digest(self) -> bytes:
        return transcript(
            b"round-context",
            struct.pack(">QQQ", self.run_id, self.server_round, self.vector_length),
            ids_bytes(self.cohort),
            json.dumps(self.params.to_dict(), sort_keys=True).encode(),
            self.model_hash,
            json.dumps(list(self.masked_metrics)).encode(),
            *((b"multi-round",) if self.multi_round else ()),
        )

    def to_dict(self) -> dict:
        extra = {"multi_round": True} if self.multi_round else {}
        return {**extra,
            "run_id": self.run_id,
            "server_round": self.server_round,
            "cohort": list(self.cohort),
            "params": self.params.to_dict(),
            "vector_length": self.vector_length,
            "model_hash": self.model_hash,
            "masked_metrics": list(self.masked_metrics),
        }

    @classmethod
    def from_dict(cls, data: Any, max_cohort: int = 100_000, max_vector_length: int = 2**28) -> RoundContext:
        """Parse a (possibly hostile) round context: exact types and bounded sizes are
        checked before anything is allocated.

        Raises:
            ValueError: naming the field: missing, of another type, an id outside
                uint64 or repeated, a cohort or vector larger than the bounds, a model
                hash that is not 32 bytes, invalid parameters.
        """
        if not isinstance(data, dict):
            raise ValueError("round context is not a mapping")

        def uint(name: str, high: int = 2**64 - 1) -> int:
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise ValueError(f"round context field {name!r} must be an integer in [0, {high}]")
            return value

        cohort = data.get("cohort")
        if not isinstance(cohort, list) or not 0 < len(cohort) <= max_cohort:
            raise ValueError(f"round context 'cohort' must be a list of 1 to {max_cohort} node ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**64 for i in cohort):
            raise ValueError("round context 'cohort' holds a node id outside uint64")
        if len(set(cohort)) != len(cohort):
            raise ValueError("round context 'cohort' repeats a node id")
        model = data.get("model_hash")
        if not isinstance(model, bytes) or len(model) != 32:
            raise ValueError("round context 'model_hash' must be 32 bytes")
        metrics = data.get("masked_metrics", [])
        if not isinstance(metrics, list) or len(metrics) > 64 or not all(
            isinstance(m, str) and len(m) <= 128 for m in metrics
        ):
            raise ValueError("round context 'masked_metrics' must be a list of at most 64 names")
        multi_round = data.get("multi_round", False)
        if not isinstance(multi_round, bool):
            raise ValueError("round context 'multi_round' must be a boolean")
        vector_length = uint("vector_length", max_vector_length)
        if vector_length < 1 + len(metrics):
            raise ValueError("round context 'vector_length' is shorter than its metrics and weight")
        return cls(
            run_id=uint("run_id"),
            server_round=uint("server_round"),
            cohort=tuple(sorted(cohort)),
            params=SecAggParams.from_dict(data.get("params")),
            vector_length=vector_length,
            model_hash=model,
            masked_metrics=tuple(metrics),
            multi_round=multi_round,
        )
