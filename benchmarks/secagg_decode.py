"""Peak memory of decoding the largest SecAgg+ control payloads a node accepts (issue 20).

For each payload shape, the peak of Python allocations (``tracemalloc``) while
decoding, in bytes and as a multiple of the payload's size, with the bounded codec
(:func:`flwr_guard.secagg.codec.decode` with the client's bounds: 64 MiB,
``control_items`` of the default policy) and, in the same run, with the codec before
issue 20 (``json.loads`` with the same object hook, no bound), and the time to refuse.

Shapes (client side, cap ``MAX_CONTROL_BYTES`` = 64 MiB):
- ``one-bytes-field``: one base64 field filling the cap (a roster of ~300 000 entries);
- ``max-items-ids``: a list of node ids at the item bound (4 * max_cohort + 4096);
- ``ints-60MB``: the issue's payload, 60 MB of ``0,0,0,...`` (refused by the bound);
- ``nested-100kB``: ``[`` x 50 000 (refused by the depth bound; RecursionError before);
- ``dict-items``: ``{"123": {"__b64": ""}, ...}`` up to the item bound.

Usage: python benchmarks/secagg_decode.py  (writes benchmarks/results/secagg_decode.json)
"""

from __future__ import annotations

import base64
import json
import time
import tracemalloc
from pathlib import Path

from flwr_guard.secagg import codec
from flwr_guard.secagg.mod import MAX_CONTROL_BYTES, control_items
from flwr_guard.secagg.policy import SecAggPolicy


def _old_decode(blob: bytes) -> object:
    """The codec before issue 20 (unbounded ``json.loads``)."""
    def hook(obj):
        if len(obj) == 1 and "__b64" in obj:
            return base64.b64decode(obj["__b64"], validate=True)
        return obj
    return json.loads(blob, object_hook=hook)


def measure(decode, blob: bytes) -> dict:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        decode(blob)
        outcome = "decoded"
    except (codec.MalformedMessage, ValueError, RecursionError) as err:
        outcome = f"refused: {type(err).__name__}: {str(err)[:60]}"
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"outcome": outcome, "peak_bytes": peak, "peak_over_payload": round(peak / len(blob), 3),
            "seconds": round(seconds, 3)}


def payloads(items: int) -> dict[str, bytes]:
    field_len = (MAX_CONTROL_BYTES - 64) * 3 // 4
    ids = ",".join(str(2**62 + i) for i in range(items - 8))
    per = len(b'"1234567":{"__b64":""},')
    entries = min(items // 4 - 8, (MAX_CONTROL_BYTES - 16) // per)
    return {
        "one-bytes-field": codec.encode({"roster": bytes(field_len)}),
        "max-items-ids": ('{"absent":[' + ids + "]}").encode(),
        "ints-60MB": b"[" + b"0," * (30 * 10**6 - 1) + b"0]",
        "nested-100kB": b"[" * 50_000 + b"]" * 50_000,
        "dict-items": ("{" + ",".join(f'"{1000000 + i}":{{"__b64":""}}' for i in range(entries))
                       + "}").encode(),
    }


def main() -> None:
    items = control_items(SecAggPolicy())
    out = {"cap_bytes": MAX_CONTROL_BYTES, "max_items": items, "shapes": {}}
    for name, blob in payloads(items).items():
        row = {"payload_bytes": len(blob),
               "bounded": measure(lambda b: codec.decode(b, max_items=items), blob)}
        if name != "ints-60MB":  # the issue measured 1.65 GB for it: not re-run here
            row["before"] = measure(_old_decode, blob)
        out["shapes"][name] = row
        print(f"{name:16s} {len(blob) / 2**20:7.1f} MiB  bounded: peak "
              f"{row['bounded']['peak_bytes'] / 2**20:8.1f} MiB "
              f"({row['bounded']['peak_over_payload']}x) {row['bounded']['seconds']}s "
              f"{row['bounded']['outcome'][:50]}"
              + (f" | before: {row['before']['peak_bytes'] / 2**20:8.1f} MiB "
                 f"({row['before']['peak_over_payload']}x) {row['before']['outcome'][:40]}"
                 if "before" in row else ""))
    path = Path(__file__).parent / "results" / "secagg_decode.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
