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
    """

    run_id: int
    server_round: int
    cohort: tuple[int, ...]
    params: SecAggParams
    vector_length: int
    model_hash: bytes
    masked_metrics: tuple[str, ...] = ()

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
        )

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "server_round": self.server_round,
            "cohort": list(self.cohort),
            "params": self.params.to_dict(),
            "vector_length": self.vector_length,
            "model_hash": self.model_hash,
            "masked_metrics": list(self.masked_metrics),
        }

    @classmethod
    def from_dict(cls, data: dict) -> RoundContext:
        return cls(
            run_id=int(data["run_id"]),
            server_round=int(data["server_round"]),
            cohort=tuple(sorted(int(i) for i in data["cohort"])),
            params=SecAggParams.from_dict(data["params"]),
            vector_length=int(data["vector_length"]),
            model_hash=bytes(data["model_hash"]),
            masked_metrics=tuple(str(m) for m in data.get("masked_metrics", ())),
        )
