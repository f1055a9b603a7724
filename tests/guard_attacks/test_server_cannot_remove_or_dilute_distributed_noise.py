"""Distributed DP: the server removes or dilutes the clients' Skellam noise.

The policy reads z from the ConfigRecord holding the manifest, falling back to the
manifest's own z when the config has none; the SecAgg+ mod reads z from the *first*
non-secagg ConfigRecord and adds no noise when it is absent; nobody checks
dp-min-contributors. Each variant should end in a refusal or in noise being added with
the policy's parameters.
"""
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from guard_attack_helpers import TamperGrid, app, fedavg, initial, stage

import flwr_guard.dp.distributed_client as secagg_mod
from flwr_guard.guard import ClientPolicy
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import DistributedDP, GuardedStrategy, SecAgg

N = 3
POLICY = ClientPolicy(secagg=True, dp="distributed", min_noise_multiplier=1.0, max_clipping_norm=1.0)


@pytest.fixture
def noise_calls(monkeypatch):
    calls = []
    real = secagg_mod.skellam_noise_for_secagg

    def spy(z, c, min_contributors, step, dim, rng):
        calls.append({"z": z, "C": c, "min_contributors": min_contributors})
        return real(z, c, min_contributors, step, dim, rng)

    monkeypatch.setattr(secagg_mod, "skellam_noise_for_secagg", spy)
    return calls


def _run(tamper):
    guard = ClientGuard(POLICY)
    grid = TamperGrid({node: app(guard.train_mods()) for node in range(11, 11 + N)}, tamper)
    strategy = GuardedStrategy(fedavg(N), secagg=SecAgg(timeout=5),
                               dp=DistributedDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=1.0, clipping_norm=1.0,
                                                min_contributors=N))
    try:
        strategy.start(grid, initial(), num_rounds=1)
    except Exception as err:  # a refusal / failed run is the safe outcome
        return grid, err
    return grid, None


def _on_masked_input(fn):
    def tamper(msg):
        if stage(msg) != "masked-input":
            return msg
        return Message(fn(msg.content), msg.metadata.dst_node_id, msg.metadata.message_type,
                       group_id=msg.metadata.group_id)
    return tamper


def _answered_masked_input(grid):
    return [r for r in grid.received if not r.has_error() and "masked" in r.content.array_records]


def _check(grid, err, calls):
    sent = _answered_masked_input(grid)
    assert not sent or (len(calls) == len(sent) and all(
        c["z"] >= 1.0 and c["C"] <= 1.0 and c["min_contributors"] <= N for c in calls)), (
        f"{len(sent)} masked inputs were sent with noise calls {calls} (run error: {err!r})")


def test_honest_distributed_round_adds_noise(noise_calls):
    grid, err = _run(lambda m: m)
    assert err is None and len(noise_calls) == N
    _check(grid, err, noise_calls)


def test_noise_multiplier_removed_from_config(noise_calls):
    def drop_z(content):
        cfg = ConfigRecord({k: v for k, v in content["config"].items() if k != "dp-noise-multiplier"})
        out = RecordDict(dict(content.items()))
        out["config"] = cfg
        return out
    grid, err = _run(_on_masked_input(drop_z))
    _check(grid, err, noise_calls)


def test_decoy_config_record_first(noise_calls):
    def decoy(content):
        out = RecordDict({"aaa": ConfigRecord({"dp-noise-multiplier": 0.0})})
        for k, v in content.items():
            out[k] = v
        return out
    grid, err = _run(_on_masked_input(decoy))
    _check(grid, err, noise_calls)


def test_min_contributors_inflated(noise_calls):
    def inflate(content):
        out = RecordDict(dict(content.items()))
        cfg = ConfigRecord(dict(content["config"]))
        cfg["dp-min-contributors"] = 10**6
        out["config"] = cfg
        return out
    grid, err = _run(_on_masked_input(inflate))
    _check(grid, err, noise_calls)
