"""Dropout and fault tolerance of SecAgg+ rounds (issue 20): rounds completed with
1..k-t clients lost at each stage (the roster stage included), and with one bad client,
per-round and multi-round sessions, now and at a baseline commit, in the same run.

Every round runs the real :class:`~flwr_guard.secagg.SecAggPlus` (around FedAvg) and
the real ``secaggplus_mod`` of each node in one process (``tests/secagg_harness.py``:
no network, no training; each node's update is known). A round counts as completed
when it released the exact weighted mean of the survivors (to one quantisation step).
A node lost at a stage answers nothing from that stage on. Trials differ by the node
ids (so by the graph) and by which nodes are lost.

Usage: python benchmarks/secagg_tolerance.py [--n 10] [--trials 3] [--baseline a71cc33]
Prints a table and writes benchmarks/results/secagg_tolerance.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

ORDER = ("advertise", "roster", "share-keys", "masked-input", "consistency", "unmask")


def _fed(n: int, seed: int):
    from secagg_harness import ModFederation

    tmp = Path(tempfile.mkdtemp(prefix="tolerance-"))
    return ModFederation(n, tmp, seed=seed)


def _exact(fed, agg, survivors) -> bool:
    import numpy as np

    from flwr_guard.secagg.params import SecAggParams

    return agg is not None and bool(np.abs(agg - fed.expected_mean(survivors)).max()
                                    < SecAggParams(5, 3).step)


def losses_cell(n: int, trials: int, stage: str, losses: int, multi_round: bool) -> int:
    import numpy as np
    from secagg_harness import run_strategy_rounds

    done = 0
    for trial in range(trials):
        fed = _fed(n, seed=100 + trial)
        rng = np.random.default_rng(trial)
        gone = {int(i) for i in rng.choice(fed.ids, size=losses, replace=False)}
        fed.tamper = (lambda s, node, msg, g=gone:
                      None if node in g and ORDER.index(s) >= ORDER.index(stage) else msg)
        ((agg, _),) = run_strategy_rounds(fed, 1, multi_round=multi_round)
        after_input = ORDER.index(stage) > ORDER.index("masked-input")
        survivors = fed.ids if after_input else [i for i in fed.ids if i not in gone]
        done += _exact(fed, agg, survivors)
    return done


def _bad_cases():
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message
    from flwr.common.constant import ErrorCode

    from flwr_guard.secagg import codec
    from flwr_guard.secagg.constants import MASKED_ARRAYS, SECAGG_RECORD

    def payload(stage_wanted, change):
        def edit(stage, reply):
            if stage != stage_wanted:
                return reply
            p = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
            change(p)
            reply.content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(p)})
            return reply
        return edit

    def first_random(name):
        def change(p):
            if name in p and p[name]:
                key = sorted(p[name])[0]
                p[name][key] = np.random.default_rng(1).bytes(len(p[name][key]))
        return change

    def zero(stage, reply):
        if stage == "masked-input":
            (v,) = reply.content.array_records[MASKED_ARRAYS].to_numpy_ndarrays()
            reply.content[MASKED_ARRAYS] = ArrayRecord(numpy_ndarrays=[np.zeros_like(v)])
        return reply

    def silent_roster(stage, reply):
        return None if stage in ("roster", "share-keys", "masked-input", "consistency", "unmask") else reply

    def nested(stage_wanted):
        def edit(stage, reply):
            if stage == stage_wanted:
                reply.content[SECAGG_RECORD] = ConfigRecord({"payload": b"[" * 50_000 + b"]" * 50_000})
            return reply
        return edit

    def no_session(stage, reply):
        if stage == "masked-input":
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION,
                                 "SecAgg+ refused: no usable SecAgg+ session on this client: lost"),
                           reply_to=reply)
        return reply

    def pair_seed(stage, reply):
        if stage == "unmask":
            p = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
            for k in p.get("pair_seeds", {}):
                p["pair_seeds"][k] = b"\x05" * 32
            reply.content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(p)})
        return reply

    both = (False, True)
    return {
        "silent at the roster stage": (both, silent_roster),
        "random graph nonce": (both, payload("roster", lambda p: p.__setitem__("nonce", b"\x07" * 32))),
        "random share ciphertext to one peer": ((False,), payload("share-keys", first_random("ciphertexts"))),
        "all-zero masked vector": (both, zero),
        "random self-mask commitment": ((True,), payload("masked-input", lambda p: p.__setitem__("commitment", b"\x01" * 32))),
        "wrong pair seed (neighbour dropped)": ((True,), pair_seed),
        "100 kB nested JSON reply (roster)": (both, nested("roster")),
        "'no usable session' error reply": ((True,), no_session),
    }


def _resign_reveal(fed, node: int, reply):
    """Sign an edited session unmask reply with the node's own key (a colluding client
    signs its lie; unsigned, the reveal is dropped whole as unverifiable)."""
    from flwr.app import ConfigRecord

    from flwr_guard.secagg import codec, crypto
    from flwr_guard.secagg.constants import SECAGG_RECORD, STATE_RECORD
    from flwr_guard.secagg.keys import load_signing_key
    from flwr_guard.secagg.transcripts import session_reveal_payload

    payload = codec.decode(reply.content.config_records[SECAGG_RECORD]["payload"])
    if "reveal_signature" not in payload:
        return reply
    state = fed.contexts[node].state.config_records[STATE_RECORD]
    digest = codec.decode(state["session"])["round"]["digest"]
    key = load_signing_key(fed.contexts[node].node_config["secagg-signing-key"])
    seeds = {int(k): v for k, v in payload["pair_seeds"].items()}
    payload["reveal_signature"] = crypto.sign(key, session_reveal_payload(digest, node, seeds))
    reply.content[SECAGG_RECORD] = ConfigRecord({"payload": codec.encode(payload)})
    return reply


def bad_cell(name: str, multi_round: bool, trials: int, n: int, rounds: int = 3) -> dict:
    from secagg_harness import run_strategy_rounds

    _, edit = _bad_cases()[name]
    completed, rekeys, crashed = 0, 0, 0
    for trial in range(trials):
        fed = _fed(n, seed=200 + trial)
        bad, gone = fed.ids[1], fed.ids[4]
        original = fed.deliver

        def deliver(msg, original=original, bad=bad, fed=fed):
            reply = original(msg)
            if reply is None or reply.has_error() or msg.metadata.dst_node_id != bad:
                return reply
            from flwr_guard.secagg.constants import SECAGG_RECORD
            return edit(str(msg.content.config_records[SECAGG_RECORD]["stage"]), reply)

        if "pair seed" in name:  # a colluding client: it signs its wrong reveal itself
            def deliver(msg, original=original, bad=bad, fed=fed):
                from flwr_guard.secagg.constants import SECAGG_RECORD
                reply = original(msg)
                if reply is None or reply.has_error() or msg.metadata.dst_node_id != bad:
                    return reply
                return _resign_reveal(fed, bad, edit(str(msg.content.config_records[SECAGG_RECORD]["stage"]), reply))
        fed.deliver = deliver
        if "pair seed" in name:  # an early dropout whose pair seeds get revealed
            fed.tamper = lambda s, node, msg, g=gone: None if node == g and s == "masked-input" else msg
        try:
            results = run_strategy_rounds(fed, rounds, multi_round=multi_round)
        except Exception:  # counted: the run would have ended here
            crashed += 1
            continue
        completed += sum(agg is not None for agg, _ in results)
        rekeys += sum(r.key_setup for _, r in results[1:])
    return {"rounds_completed": completed, "rounds": rounds * trials, "runs_crashed": crashed,
            "cohort_rekeys_after_round_1": rekeys}


def table(n: int, trials: int) -> dict:
    from flwr_guard.secagg.params import SecAggParams

    logging.disable(logging.CRITICAL)
    params = SecAggParams.for_cohort(n)
    k, t = params.num_shares, params.reconstruction_threshold
    out: dict = {"n": n, "k": k, "t": t, "trials": trials, "losses": {}, "bad_client": {}}
    for multi_round in (False, True):
        mode = "session" if multi_round else "per-round"
        for stage in ORDER:
            if multi_round and stage == "share-keys":
                continue
            for losses in range(1, k - t + 1):
                out["losses"][f"{mode}|{stage}|{losses}"] = losses_cell(n, trials, stage, losses, multi_round)
    for name, (modes, _) in _bad_cases().items():
        for multi_round in modes:
            mode = "session" if multi_round else "per-round"
            out["bad_client"][f"{mode}|{name}"] = bad_cell(name, multi_round, trials, n)
    return out


def _baseline(commit: str, n: int, trials: int) -> dict:
    archive = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=BytesIO(archive)).extractall(tmp)
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        result = subprocess.run([sys.executable, __file__, "--n", str(n), "--trials", str(trials),
                                 "--json-only"], env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--baseline", default="a71cc33")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    now = table(args.n, args.trials)
    if args.json_only:
        print(json.dumps(now))
        return
    before = _baseline(args.baseline, args.n, args.trials) if args.baseline else None
    print(f"n = {now['n']}, k = {now['k']}, t = {now['t']}, {args.trials} trials per cell; "
          f"rounds completed with the exact survivor mean (before = {args.baseline})")
    print("| mode | stage | " + " | ".join(f"{j} lost" for j in range(1, now["k"] - now["t"] + 1)) + " |")
    rows: dict[tuple[str, str], list[str]] = {}
    for key, done in now["losses"].items():
        mode, stage, _ = key.split("|")
        old = before["losses"].get(key) if before else None
        rows.setdefault((mode, stage), []).append(
            f"{done}/{args.trials}" + (f" (before {old}/{args.trials})" if old is not None else ""))
    for (mode, stage), cells in rows.items():
        print(f"| {mode} | {stage} | " + " | ".join(cells) + " |")
    print("\n| mode | one bad client (3 rounds per trial) | rounds completed | cohort re-keys "
          "after round 1 | runs ended by an exception |")
    for key, cell in now["bad_client"].items():
        mode, name = key.split("|")
        old = before["bad_client"].get(key) if before else None
        def rekeys(c, mode=mode):  # every per-round round sets keys up: not counted
            return "-" if mode == "per-round" else str(c["cohort_rekeys_after_round_1"])
        print(f"| {mode} | {name} | {cell['rounds_completed']}/{cell['rounds']}"
              + (f" (before {old['rounds_completed']}/{old['rounds']})" if old else "")
              + f" | {rekeys(cell)}" + (f" (before {rekeys(old)})" if old else "")
              + f" | {cell['runs_crashed']}" + (f" (before {old['runs_crashed']})" if old else "") + " |")
    path = ROOT / "benchmarks" / "results" / "secagg_tolerance.json"
    path.write_text(json.dumps({"after": now, "before": before, "baseline": args.baseline}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
