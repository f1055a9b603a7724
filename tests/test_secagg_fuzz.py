"""Seeded fuzzing of every SecAgg+ message type, both modes, both sides (issue 20).

One client (server side: its replies; client side: the instructions it receives) gets
malformed, truncated, oversized, wrong-typed and deeply nested inputs at each stage of
the per-round protocol (advertise, roster, share-keys, masked-input, consistency,
unmask) and of multi-round sessions (set-up, input, consistency, unmask), through the
real :class:`~flwr_guard.secagg.SecAggPlus` strategy and the real
``secaggplus_mod`` (tests/secagg_harness.py). Asserted: no exception escapes the
strategy or a mod, and no round is lost: every round aggregates, and its aggregate is
the exact weighted mean of the survivors it reports (all clients, or all but the
fuzzed one, or, for a share to one peer that does not open, all but the disputed pair).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import combinations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
from flwr.common.constant import ErrorCode
from secagg_harness import ModFederation, run_strategy_rounds

from flwr_guard.secagg import codec
from flwr_guard.secagg.constants import MASKED_ARRAYS, SECAGG_RECORD
from flwr_guard.secagg.mod import MAX_CONTROL_BYTES
from flwr_guard.secagg.params import SecAggParams
from flwr_guard.secagg.strategy import MAX_REPLY_BYTES

N = 7
STEP = SecAggParams(5, 3).step
PAYLOAD_MUTATIONS = ("truncate", "random", "nested", "wide", "oversized", "wrong-type",
                     "deep-field", "not-bytes", "no-record", "extra-keys", "error")
ARRAY_MUTATIONS = ("empty-array", "wrong-dtype", "wrong-shape", "zero-vector", "two-arrays",
                   "no-array")


def _wrong_value(rng: np.random.Generator):
    choices = (1, -1, 2**70, "x", [], {}, None, True, 1.5, {"__b64": "!!"}, {"__b64": 3},
               [[[[1]]]], {"1": [1, 2, 3]}, "9" * 5000)
    return choices[int(rng.integers(len(choices)))]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def mutate_payload(blob: bytes, kind: str, rng: np.random.Generator, cap: int) -> object:
    """A hostile version of a codec-encoded payload (``cap``: the receiver's byte limit)."""
    if kind == "truncate":
        return blob[: int(rng.integers(0, max(1, len(blob))))]
    if kind == "random":
        return rng.bytes(len(blob))
    if kind == "nested":
        return _nested(100_000)  # 200 kB: far below the cap, far above any depth
    if kind == "wide":
        return b"[" + b"0," * 300_000 + b"0]"
    if kind == "oversized":
        return b" " * (cap + 1)
    if kind == "not-bytes":
        return "a string payload"
    payload = codec.decode(blob, max_items=2**22)
    if kind == "wrong-type":
        for key in payload:
            payload[key] = _wrong_value(rng)
    elif kind == "deep-field":
        key = sorted(payload)[int(rng.integers(len(payload)))] if payload else "x"
        payload[key] = {"a": None}
        inner = payload[key]
        for _ in range(40):
            inner["a"] = {"a": None}
            inner = inner["a"]
        return codec.encode(payload)[:cap]
    elif kind == "extra-keys":
        payload.update({f"extra{i}": _wrong_value(rng) for i in range(5)})
    return codec.encode(payload)


def mutate_message(msg: Message, kind: str, rng: np.random.Generator, cap: int) -> Message:
    """``msg`` (an instruction or a reply) with its SecAgg+ record or arrays mutated."""
    content = msg.content
    if kind in PAYLOAD_MUTATIONS:
        if kind == "no-record":
            del content[SECAGG_RECORD]
            return msg
        record = content.config_records[SECAGG_RECORD]
        fields = dict(record)
        fields["payload"] = mutate_payload(bytes(record["payload"]), kind, rng, cap)
        content[SECAGG_RECORD] = ConfigRecord(fields)
        return msg
    names = list(content.array_records)
    name = MASKED_ARRAYS if MASKED_ARRAYS in names else (names[0] if names else "arrays")
    if kind == "no-array":
        if name in content:
            del content[name]
        return msg
    (vector,) = content.array_records[name].values() if name in content else (None,)
    if kind == "empty-array":
        content[name] = ArrayRecord({"x": Array(dtype="<u4", shape=(10,), stype="numpy.ndarray",
                                                data=b"")})
    elif kind == "wrong-dtype":
        content[name] = ArrayRecord(numpy_ndarrays=[np.ones(vector.shape, dtype=np.float64)])
    elif kind == "wrong-shape":
        content[name] = ArrayRecord(numpy_ndarrays=[np.ones((3, 3), dtype=np.uint32)])
    elif kind == "zero-vector":
        content[name] = ArrayRecord(numpy_ndarrays=[np.zeros(vector.shape, dtype=vector.numpy().dtype)])
    elif kind == "two-arrays":
        content[name] = ArrayRecord(numpy_ndarrays=[vector.numpy(), vector.numpy()])
    return msg


class FuzzFederation(ModFederation):
    """A :class:`ModFederation` whose ``bad`` node's replies are mutated per round:
    ``plan[server_round] = (stage, mutation)``."""

    def __init__(self, n, tmp_path, seed=0):
        super().__init__(n, tmp_path, seed=seed)
        self.bad = self.ids[2]
        self.plan: dict[int, tuple[str, str]] = {}
        self.rng = np.random.default_rng(seed)
        self.applied: dict[int, tuple[str, str]] = {}

    def deliver(self, msg):
        reply = super().deliver(msg)  # a mod that raised fails the test here
        if reply is None or msg.metadata.dst_node_id != self.bad:
            return reply
        record = msg.content.config_records.get(SECAGG_RECORD)
        stage, server_round = str(record["stage"]), int(record["server-round"])
        wanted = self.plan.get(server_round)
        if wanted is None or wanted[0] != stage or reply.has_error():
            return reply
        self.applied[server_round] = wanted
        if wanted[1] == "error":
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "fuzzed"), reply_to=msg)
        return mutate_message(reply, wanted[1], self.rng, MAX_REPLY_BYTES)


def _assert_exact(fed: ModFederation, results, excluded: Callable[[int], set[int]] | None = None):
    """Every round aggregated the exact mean of one plausible survivor set."""
    for r, (agg, report) in enumerate(results, start=1):
        assert report.aborted is None, (r, getattr(fed, "applied", {}).get(r), report.aborted)
        candidates = [fed.ids, [i for i in fed.ids if i != fed.bad]]
        # A share that does not open for one peer excludes the disputed pair.
        candidates += [[i for i in fed.ids if i not in (fed.bad, p)] for p in fed.ids if p != fed.bad]
        matches = [c for c in candidates if len(c) == report.survivors
                   and np.abs(agg - fed.expected_mean(c)).max() < STEP]
        assert matches, (r, getattr(fed, "applied", {}).get(r), report.survivors, report.excluded)


def _plan(stages, mutations, rounds, rng):
    """A seeded cover of (stage, mutation) pairs, one per round."""
    pairs = [(s, m) for s in stages for m in mutations]
    rng.shuffle(pairs)
    return {r + 1: pairs[r % len(pairs)] for r in range(rounds)}


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.CRITICAL)  # thousands of expected warnings


def test_server_survives_fuzzed_replies_per_round(tmp_path):
    rng = np.random.default_rng(20)
    fed = FuzzFederation(N, tmp_path, seed=20)
    stages = ("advertise", "roster", "share-keys", "consistency", "unmask")
    fed.plan = _plan(stages, PAYLOAD_MUTATIONS, len(stages) * len(PAYLOAD_MUTATIONS), rng)
    masked = _plan(("masked-input",), PAYLOAD_MUTATIONS + ARRAY_MUTATIONS, 17, rng)
    fed.plan.update({len(fed.plan) + r: v for r, v in masked.items()})
    results = run_strategy_rounds(fed, len(fed.plan), multi_round=False)
    _assert_exact(fed, results)
    assert set(fed.applied.values()) == set(fed.plan.values())  # every case was exercised


def test_server_survives_fuzzed_replies_in_sessions(tmp_path):
    rng = np.random.default_rng(21)
    fed = FuzzFederation(N, tmp_path, seed=21)
    plan = _plan(("masked-input",), PAYLOAD_MUTATIONS + ARRAY_MUTATIONS, 17, rng)
    plan.update({17 + r: v for r, v in _plan(("consistency", "unmask"), PAYLOAD_MUTATIONS,
                                               22, rng).items()})
    fed.plan = plan
    results = run_strategy_rounds(fed, len(plan), multi_round=True)
    _assert_exact(fed, results)
    assert set(fed.applied.values()) == set(plan.values())
    # The session's set-up stages: a fresh session per case (the set-up runs in round 1).
    for kind in PAYLOAD_MUTATIONS:
        for stage in ("advertise", "roster"):
            fed.plan, fed.applied = {1: (stage, kind)}, {}
            results = run_strategy_rounds(fed, 1, multi_round=True)
            _assert_exact(fed, results)
            assert fed.applied == {1: (stage, kind)}


@pytest.mark.parametrize("multi_round", [False, True])
def test_client_mods_survive_fuzzed_instructions(tmp_path, multi_round):
    """The victim's mod answers every hostile instruction with a reply (an error reply
    when it refuses) and the round goes on without it."""
    rng = np.random.default_rng(22 + multi_round)
    fed = ModFederation(N, tmp_path, seed=22)
    fed.bad = victim = fed.ids[2]
    stages = (("masked-input", "consistency", "unmask") if multi_round else
              ("advertise", "roster", "share-keys", "masked-input", "consistency", "unmask"))
    # (Without the secagg record a message is no SecAgg+ instruction: it passes through
    # to the app, as documented; the ClientGuard's manifest check covers that case.)
    cases = [(s, m) for s in stages for m in PAYLOAD_MUTATIONS if m not in ("error", "no-record")]
    cases += [("masked-input", m) for m in ("empty-array", "two-arrays", "no-array", "wrong-shape")]
    rng.shuffle(cases)
    replies = []
    plan = {r + 1: case for r, case in enumerate(cases)}

    def tamper(stage, node, msg):
        record = msg.content.config_records[SECAGG_RECORD]
        wanted = plan.get(int(record["server-round"]))
        if node != victim or wanted is None or wanted[0] != stage:
            return msg
        hostile = mutate_message(msg, wanted[1], rng, MAX_CONTROL_BYTES)
        reply = _deliver_direct(fed, hostile)
        replies.append((wanted, reply))
        return None  # the server never hears from it this stage

    fed.tamper = tamper
    results = run_strategy_rounds(fed, len(plan), multi_round=multi_round)
    _assert_exact(fed, results)
    assert len(replies) == len(plan)
    for (stage, kind), reply in replies:
        assert isinstance(reply, Message)
        if kind not in ("extra-keys",):
            assert reply.has_error(), (stage, kind)


def _deliver_direct(fed: ModFederation, msg: Message) -> Message:
    """The hostile instruction straight into the victim's real mod (bypassing tamper)."""
    from flwr_guard.secagg.mod import secaggplus_mod

    node = msg.metadata.dst_node_id
    return secaggplus_mod(msg, fed.contexts[node], fed._train)


def test_codec_bounds_hold_before_parsing():
    """Depth and item bounds refuse before ``json.loads`` allocates; encodings of every
    legitimate shape round-trip."""
    with pytest.raises(codec.MalformedMessage, match="deeper than 16"):
        codec.decode(_nested(1000))
    with pytest.raises(codec.MalformedMessage, match="more than 65536 items"):
        codec.decode(_nested(10**6))
    with pytest.raises(codec.MalformedMessage, match="more than 100 items"):
        codec.decode(b"[" + b"1," * 200 + b"1]", max_items=100)
    # Brackets inside strings are not structure; a closing quote escaped is not the end.
    text = codec.encode({"s": "[[[[{{{{" * 100, "q": 'a"]]]', "b": b"\x00" * 40})
    assert codec.decode(text, max_depth=2) == {"s": "[[[[{{{{" * 100, "q": 'a"]]]', "b": b"\x00" * 40}
    for bad in (b"", b"[]", b"{", b'{"__b64": "**"}', b'{"x": {"__b64": 1}}', b"\xff\xfe",
                b'{"a": 1e999999}', b'{"a": ' + b"9" * 5000 + b"}"):
        try:
            codec.decode(bad)
        except codec.MalformedMessage:
            continue
    for a, b in combinations([b"x" * 3, b"", bytes(range(256))], 2):
        assert codec.decode(codec.encode({"a": a, "b": [b, {"c": a}]})) == {"a": a, "b": [b, {"c": a}]}


def test_the_recovery_stage_survives_fuzzing_both_ways(tmp_path):
    """``unmask-recover`` (sent only in a round with a proven culprit,
    tests/test_secagg_recover.py): one neighbour of the culprit gets a fuzzed instruction
    (client side: its real mod answers every one with a reply, an error reply when it
    refuses) or sends a fuzzed reply (server side). Nothing raises; the round either
    completes with the exact mean of the honest others or, since that neighbour's pair
    seed with the culprit is missing (a second bad client), aborts naming it; the next
    round completes without the culprit."""
    from test_secagg_recover import Colluder

    rng = np.random.default_rng(24)
    for side in ("client", "server"):
        for kind in PAYLOAD_MUTATIONS:
            if side == "client" and kind in ("error", "no-record"):
                continue
            path = tmp_path / f"{side}-{kind}"
            path.mkdir()
            fed = Colluder(N, path, seed=24)
            gone, fed.liar = fed.ids[4], fed.ids[1]
            fuzzed = fed.ids[2]
            replies: list[Message] = []

            def tamper(stage, node, msg, fed=fed, gone=gone, fuzzed=fuzzed, side=side, kind=kind,
                       replies=replies):
                if node == gone and stage == "masked-input":
                    return None
                if side == "client" and node == fuzzed and stage == "unmask-recover":
                    replies.append(_deliver_direct(fed, mutate_message(msg, kind, rng, MAX_CONTROL_BYTES)))
                    return None
                return msg

            fed.tamper = tamper
            if side == "server":
                original = fed.deliver

                def deliver(msg, original=original, fuzzed=fuzzed, kind=kind, replies=replies):
                    reply = original(msg)
                    record = msg.content.config_records[SECAGG_RECORD]
                    if (reply is None or msg.metadata.dst_node_id != fuzzed
                            or str(record["stage"]) != "unmask-recover"):
                        return reply
                    replies.append(reply)
                    if kind == "error":
                        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "fuzzed"), reply_to=msg)
                    return mutate_message(reply, kind, rng, MAX_REPLY_BYTES)

                fed.deliver = deliver  # type: ignore[method-assign]
            (agg1, r1), (agg2, r2) = run_strategy_rounds(fed, 2, multi_round=True)
            assert len(replies) == 1, (side, kind)  # the stage ran, once
            honest = [i for i in fed.ids if i not in (gone, fed.liar)]
            if r1.aborted is None:
                assert np.abs(agg1 - fed.expected_mean(honest)).max() < STEP, (side, kind)
            else:
                assert agg1 is None and f"node {fuzzed}" in r1.aborted, (side, kind, r1.aborted)
            if side == "client" and kind != "extra-keys":
                assert replies[0].has_error(), kind
            assert r2.aborted is None, (side, kind, r2.aborted)
            assert np.abs(agg2 - fed.expected_mean(honest)).max() < STEP, (side, kind)
