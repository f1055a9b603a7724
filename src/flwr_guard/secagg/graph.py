"""The SecAgg+ neighbour graph: a random k-regular Harary graph over the cohort.

Bell et al. (CCS 2020, section 3.2) replace SecAgg's complete graph with a random
sparse graph of degree k = O(log n). Here the graph is the Harary graph H_{k,n} (each
node linked to the k/2 nearest on each side of a ring; for odd k also to the node
opposite) over a random ordering of the cohort. The ordering is drawn from a seed
that every client derives itself from the transcript of the cohort's public keys,
so the server cannot pick the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def neighbours(node_ids: Sequence[int], num_shares: int, seed: bytes) -> dict[int, list[int]]:
    """Each node's k neighbours (sorted), symmetric, never itself.

    Args:
        node_ids: the cohort, distinct ids.
        num_shares: k, the degree; k >= n - 1 gives the complete graph. For odd k and
            odd n no k-regular graph exists: nodes then get k or k + 1 neighbours.
        seed: bytes that fix the random ordering (>= 16 bytes).

    Raises:
        ValueError: for duplicate ids or k < 1.
    """
    ids = sorted(node_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("node ids must be distinct")
    if num_shares < 1:
        raise ValueError(f"num_shares must be >= 1, got {num_shares}")
    if num_shares >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed[:32], "big")))
    ring = [ids[i] for i in rng.permutation(n)]
    edges: dict[int, set[int]] = {u: set() for u in ids}
    for pos, u in enumerate(ring):
        for step in range(1, num_shares // 2 + 1):
            v = ring[(pos + step) % n]
            edges[u].add(v)
            edges[v].add(u)
        if num_shares % 2 == 1:
            v = ring[(pos + n // 2) % n]
            edges[u].add(v)
            edges[v].add(u)
    return {u: sorted(vs) for u, vs in edges.items()}
