"""Spoofed SecAgg+ stages and hostile record layouts (these held up when run)."""
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from guard_attack_helpers import app, clear_updates, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy, ProtectionManifest
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.manifest import MANIFEST_KEY, SecAggTerms

MANIFEST = ProtectionManifest(("secagg",), secagg=SecAggTerms(None, None, 2.0, 2**16)).to_json()


@pytest.mark.parametrize("secagg_record", [
    ConfigRecord({"stage": "advertise", "payload": b""}),
    ConfigRecord({"stage": "consistency", "payload": b"\x00"}),
    ConfigRecord({"stage": "unmask"}),
    ConfigRecord({"stage": "masked-input", "payload": b"junk"}),
    ConfigRecord({"stage": ["masked-input"], "payload": b""}),
    ConfigRecord({"stage": b"masked-input", "payload": b""}),
    ConfigRecord({"stage": "MASKED-INPUT", "payload": b""}),
    ConfigRecord({"payload": b""}),
    MetricRecord({"stage": 3}),
    ArrayRecord(),
], ids=lambda r: type(r).__name__ + ":" + str(dict(r).get("stage", "-")))
@pytest.mark.parametrize("policy", [ClientPolicy(secagg=True), ClientPolicy(dp="central"), ClientPolicy()],
                         ids=["secagg", "central-dp", "nothing"])
def test_spoofed_stage_with_the_model_never_trains_in_the_clear(secagg_record, policy):
    calls = []
    guard = ClientGuard(policy)

    def fn(msg, context):
        calls.append(1)
        from guard_attack_helpers import train_fn
        return train_fn()(msg, context)

    grid = LoopbackGrid({11: app(guard.train_mods(), fn=fn)})
    content = RecordDict({"arrays": initial(), "config": ConfigRecord({MANIFEST_KEY: MANIFEST}),
                          "secagg": secagg_record})
    [reply] = grid.send_and_receive([grid.create_message(content, "train", 11, "1")])
    if policy.secagg:
        assert clear_updates(grid) == [] and not calls
    assert reply.has_error() or not calls


def test_metrics_carrying_the_update_are_blocked_under_secagg():
    """A train function that reports its update as a list metric: plain metrics travel in
    the clear next to the masked vector; the reply inspector should catch it."""
    from flwr.app import Message
    from guard_attack_helpers import arrays, fedavg

    from flwr_guard.guard.strategy import GuardedStrategy, SecAgg

    def leaky(msg, context):
        w = msg.content["arrays"]["w"].numpy() + 0.01 * context.node_id
        return Message(RecordDict({"arrays": arrays(w), "metrics": MetricRecord(
            {"num-examples": 10, "debug-update": [float(v) for v in (w.ravel() - 0)]})}), reply_to=msg)

    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = LoopbackGrid({n: app(guard.train_mods(), fn=leaky) for n in range(11, 14)})
    try:
        GuardedStrategy(fedavg(3), secagg=SecAgg(timeout=5)).start(grid, initial(), num_rounds=1)
    except Exception:
        pass
    leaked = [r for r in grid.received if not r.has_error()
              and any("debug-update" in m for m in r.content.metric_records.values())]
    assert not leaked, f"{len(leaked)} replies carried the update as a plain metric"
