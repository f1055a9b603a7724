"""The façades: ClientGuard and GuardedStrategy, checked on both sides.

Fast tests over :mod:`guard_harness` (real ClientApps, Flower's serde, no Ray); the
quickstart fixture runs the same façades in a real simulation (test_guard_quickstart).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy, ManifestError, ProtectionManifest
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.client_mod import POLICY_REFUSAL, policy_mod
from flwr_guard.guard.manifest import MANIFEST_KEY, MAX_MANIFEST_BYTES, DPTerms, SecAggTerms
from flwr_guard.guard.round_log import GuardMismatch
from flwr_guard.guard.strategy import (
    CentralDP,
    DistributedDP,
    GuardConfigError,
    GuardedStrategy,
    NoAggregate,
    SecAgg,
)
from flwr_guard.secagg.mod import secaggplus_mod
from flwr_guard.secagg.strategy import SecAggPlus

SHAPE = (6, 5)
NO_CHECKPOINT = {"checkpoint": None}  # DPFedAvg's default checkpoint is under $FLWR_HOME


def _initial() -> ArrayRecord:
    return _arrays(np.zeros(SHAPE, dtype=np.float32))


def _arrays(w: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(w)})


def _train_fn(step: float):
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy() + step * (1 + context.node_id % 3)
        return Message(RecordDict({"arrays": _arrays(w.astype(np.float32)),
                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)
    return train


def _app(mods, step: float = 0.01) -> ClientApp:
    app = ClientApp()
    app.train(mods=list(mods))(_train_fn(step))
    return app


# In-process clients, no federation roster: trust on first use, opted into knowingly
# (what a simulation does; docs/secagg.md). The roster path is tested in test_secagg_*.
TOFU = {"secagg-trust-on-first-use": True, "secagg-min-cohort": 2}


def _grid(n: int, mods_fn) -> LoopbackGrid:
    nodes = range(11, 11 + n)
    return LoopbackGrid({node: _app(mods_fn()) for node in nodes},
                        node_config={node: TOFU for node in nodes})


def _fedavg(n: int) -> FedAvg:
    return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)


def _clear_updates(grid: LoopbackGrid) -> list[Message]:
    """Replies that carried a model update in the clear (an ArrayRecord other than masked)."""
    return [r for r in grid.received if not r.has_error()
            and any(name != "masked" for name in r.content.array_records)]


# -- the manifest and the policy (core) --------------------------------------------------
def test_manifest_round_trips_and_refuses_malformed_documents() -> None:
    m = ProtectionManifest(("secagg", "central-dp", "update-clipping"),
                           secagg=SecAggTerms(4, 3, 2.0, 2**16), dp=DPTerms("central", 1.1, 0.5))
    assert ProtectionManifest.parse(m.to_json()) == m
    data = json.loads(m.to_json())
    bad = [
        ("x" * (MAX_MANIFEST_BYTES + 1), "larger than"),
        (12, "must be a string"),
        ("{", "not valid JSON"),
        (json.dumps({**data, "version": 2}), "version 2 is not supported"),
        (json.dumps({**data, "protections": ["secagg", "teleport"]}), "unknown protections"),
        (json.dumps({**data, "dp": {**data["dp"], "noise_multiplier": float("nan")}}), "finite"),
        (json.dumps({**data, "secagg": None}), "without its parameters"),
        (json.dumps({**data, "protections": ["distributed-dp"], "secagg": None,
                     "dp": {**data["dp"], "mode": "distributed"}}), "needs SecAgg+"),
    ]
    for text, message in bad:
        with pytest.raises(ManifestError, match=message):
            ProtectionManifest.parse(text)


def test_policy_names_each_mismatch_and_reads_the_effective_config() -> None:
    policy = ClientPolicy(secagg=True, dp="distributed", min_noise_multiplier=0.8, max_clipping_norm=1.0)
    plain = ProtectionManifest(("reply-guard",))
    assert any("requires SecAgg+" in p for p in policy.check(plain, {}))
    assert any("runs none" in p for p in policy.check(plain, {}))
    weak = ProtectionManifest(("secagg", "distributed-dp"), secagg=SecAggTerms(None, None, 2.0, 2**16),
                              dp=DPTerms("distributed", 1.0, 0.5))
    assert policy.check(weak, {"dp-clipping-norm": 0.5, "dp-noise-multiplier": 1.0}) == []
    # The manifest says z = 1.0, but the config the clients act on says 0.1: refused.
    problems = policy.check(weak, {"dp-clipping-norm": 3.0, "dp-noise-multiplier": 0.1})
    assert any("0.1 is below this client's floor 0.8" in p for p in problems)
    assert any("clipping norm 3 is above" in p for p in problems)
    assert any("lacks 'dp-clipping-norm'" in p for p in policy.check(weak, {}))
    central = ProtectionManifest(("secagg", "central-dp"), secagg=SecAggTerms(None, None, 2.0, 2**16),
                                 dp=DPTerms("central", 1.0, 0.5))
    assert any("requires distributed DP but the server runs central" in p
               for p in policy.check(central, {"dp-clipping-norm": 0.5}))
    with pytest.raises(ValueError, match="set secagg=True"):
        ClientPolicy(dp="distributed")
    with pytest.raises(ValueError, match="is a DP floor"):
        ClientPolicy(min_noise_multiplier=1.0)


# -- both façades together -----------------------------------------------------------------
def test_guarded_round_sums_under_secagg_with_the_manifest_and_nothing_in_the_clear() -> None:
    n = 4
    guard = ClientGuard(ClientPolicy(secagg=True, dp="central", max_clipping_norm=10.0))
    grid = _grid(n, guard.train_mods)
    for c in grid.contexts.values():  # the operators accept z = 1e-6 (exact sums), explicitly
        c.node_config["dp-min-noise-multiplier"] = 1e-6
    strategy = GuardedStrategy(_fedavg(n), secagg=SecAgg(timeout=5),
                               dp=CentralDP(noise_multiplier=1e-6, clipping_norm=10.0,
                                           expected_contributors=n, options=NO_CHECKPOINT))
    result = strategy.start(grid, _initial(), num_rounds=2)
    assert strategy.aggregated_rounds == 2
    # Every model-carrying train message carried the manifest of the chain that was built.
    model_msgs = [m for m in grid.sent if m.content.array_records]
    assert model_msgs and all(
        ProtectionManifest.parse(m.content["config"][MANIFEST_KEY]) == strategy.manifest
        for m in model_msgs)
    assert _clear_updates(grid) == []
    # Uniform mean of the clients' updates (weights 1 under user-level DP), per round.
    steps = [0.01 * (1 + node % 3) for node in grid.apps]
    w = result.arrays["w"].numpy()
    np.testing.assert_allclose(w, 2 * np.mean(steps), atol=2e-3)
    # weights are 1 under user-level DP: max_weight 1 keeps the masked vector 32-bit
    assert strategy.secagg is not None and strategy.secagg.max_weight == 1
    assert all(r.modulus_bits == 32 for r in strategy.secagg.history)


def test_server_without_secagg_is_refused_and_no_update_leaves() -> None:
    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = _grid(3, guard.train_mods)
    with pytest.raises(GuardMismatch, match="requires SecAgg\\+ but the server's strategy does not run it"):
        GuardedStrategy(_fedavg(3)).start(grid, _initial(), num_rounds=1)
    assert _clear_updates(grid) == []
    assert all(r.error.reason.startswith(POLICY_REFUSAL) for r in grid.received)


def test_bare_strategy_without_manifest_is_refused() -> None:
    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = _grid(2, guard.train_mods)
    _fedavg(2).start(grid, _initial(), num_rounds=1)  # a plain FedAvg, no flwr-guard at all
    assert _clear_updates(grid) == []
    assert all("sent no protection manifest" in r.error.reason for r in grid.received)


def test_forged_manifest_without_secagg_rounds_is_refused() -> None:
    # A server that claims SecAgg+ in the manifest but sends the model in plain messages.
    manifest = ProtectionManifest(("secagg",), secagg=SecAggTerms(None, None, 2.0, 2**16))
    guard = ClientGuard(ClientPolicy(secagg=True))
    grid = _grid(2, guard.train_mods)
    _fedavg(2).start(grid, _initial(), num_rounds=1,
                     train_config=ConfigRecord({MANIFEST_KEY: manifest.to_json()}))
    assert _clear_updates(grid) == []
    assert all("although the manifest announces SecAgg+" in r.error.reason for r in grid.received)


def test_client_without_the_secagg_mod_fails_the_run_clearly() -> None:
    grid = _grid(3, lambda: [])  # a ClientApp that forgot its mods
    strategy = GuardedStrategy(_fedavg(3), secagg=SecAgg(timeout=5))
    with pytest.raises(NoAggregate, match="round 1: SecAgg\\+ aborted"):
        strategy.start(grid, _initial(), num_rounds=1)


def test_dp_required_but_absent_on_the_server_is_refused() -> None:
    guard = ClientGuard(ClientPolicy(secagg=True, dp="any", min_noise_multiplier=0.5))
    grid = _grid(3, guard.train_mods)
    with pytest.raises(GuardMismatch, match="user-level DP but the server's strategy runs none"):
        GuardedStrategy(_fedavg(3), secagg=SecAgg(timeout=5)).start(grid, _initial(), num_rounds=1)
    grid = _grid(3, guard.train_mods)
    with pytest.raises(GuardMismatch, match="noise multiplier 0.1 is below"):
        GuardedStrategy(_fedavg(3), secagg=SecAgg(timeout=5),
                        dp=CentralDP(noise_multiplier=0.1, clipping_norm=1.0, expected_contributors=3,
                                     options=NO_CHECKPOINT)
                        ).start(grid, _initial(), num_rounds=1)
    assert _clear_updates(grid) == []


def test_wrong_mod_order_never_sends_the_update_in_the_clear() -> None:
    # SecAgg+ outside the policy mod: the masked-input reply would be built from a reply the
    # policy mod has not seen masked; the policy mod refuses the clear arrays.
    policy = ClientPolicy(secagg=True)
    grid = _grid(3, lambda: [secaggplus_mod, policy_mod(policy)])
    strategy = GuardedStrategy(_fedavg(3), secagg=SecAgg(timeout=5))
    with pytest.raises(GuardMismatch, match="in the clear although SecAgg\\+ is required"):
        strategy.start(grid, _initial(), num_rounds=1)
    assert _clear_updates(grid) == []


def test_dpsgd_required_but_not_used_is_refused() -> None:
    torch = pytest.importorskip("torch")
    from flwr_guard.dp.dpsgd import DPSGDConfig

    guard = ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    grid = _grid(2, guard.train_mods)  # its train function never calls private_training
    with pytest.raises(GuardMismatch, match="did not train under ClientGuard.private_training"):
        GuardedStrategy(_fedavg(2)).start(grid, _initial(), num_rounds=1)
    assert _clear_updates(grid) == []
    del torch


def test_private_training_trains_dict_batches_and_lets_the_update_out(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from flwr_guard.dp.dpsgd import DPSGDConfig

    guard = ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    rows = [{"img": torch.randn(SHAPE[1]), "label": int(i % SHAPE[0])} for i in range(64)]
    epsilons = []

    def train(msg: Message, context: Context) -> Message:
        model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
        model.weight.data = torch.tensor(msg.content["arrays"]["w"].numpy())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with guard.private_training(context, model, opt, DataLoader(rows, batch_size=16), epochs=1,
                                    input_key="img", target_key="label") as dp:
            for x, y in dp.batches():
                dp.optimizer.zero_grad()
                dp.criterion(dp.module(x), y).backward()
                dp.optimizer.step()
        epsilons.append(dp.epsilon)
        w = model.weight.detach().numpy().astype(np.float32)
        return Message(RecordDict({"arrays": _arrays(w),
                                   "metrics": MetricRecord({"num-examples": 64})}), reply_to=msg)

    apps = {}
    for node in (1, 2):
        app = ClientApp()
        app.train(mods=guard.train_mods())(train)
        apps[node] = app
    grid = LoopbackGrid(apps, node_config={n: {"dp-sgd-ledger": str(tmp_path / str(n))}
                                           for n in apps})
    GuardedStrategy(_fedavg(2)).start(grid, _initial(), num_rounds=2)
    assert not any(r.has_error() for r in grid.received)
    assert len(epsilons) == 4 and 0 < epsilons[0] < epsilons[2]  # the ledger continues
    assert len(list((tmp_path / "1").iterdir())) == 1  # the node's durable ledger


def test_invalid_combinations_raise_at_construction() -> None:
    with pytest.raises(GuardConfigError, match="pass secagg=SecAgg"):
        GuardedStrategy(FedAvg(), dp=DistributedDP(noise_multiplier=1.0, clipping_norm=1.0,
                                                   expected_contributors=2, min_contributors=2))
    from flwr_guard.dp.strategy import AdaptiveClipping

    with pytest.raises(GuardConfigError, match="adaptive clipping with distributed noise"):
        GuardedStrategy(FedAvg(), secagg=SecAgg(),
                        dp=DistributedDP(noise_multiplier=1.0, clipping_norm=1.0, expected_contributors=2,
                                         min_contributors=2,
                                         adaptive=AdaptiveClipping(0.5, 0.2)))
    with pytest.raises(GuardConfigError, match="already wrapped in SecAggPlus"):
        GuardedStrategy(SecAggPlus(FedAvg()))
    with pytest.raises(GuardConfigError, match="weights by 'num-examples'"):
        GuardedStrategy(FedAvg(weighted_by_key="n"), secagg=SecAgg())


def test_a_run_without_any_aggregate_fails() -> None:
    def broken(msg: Message, context: Context) -> Message:
        raise RuntimeError("disk full")

    app = ClientApp()
    app.train()(broken)
    grid = LoopbackGrid({1: app, 2: app})
    with pytest.raises(NoAggregate, match="no round of 2 produced an aggregate"):
        GuardedStrategy(_fedavg(2)).start(grid, _initial(), num_rounds=2)


def test_audit_of_a_normalised_model_sees_pixels_in_unit_range() -> None:
    torch = pytest.importorskip("torch")
    from flwr_guard.guard.client import LeakageAudit, _normalised_model, _unit_range_data

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    pixels = torch.rand(5, 1, 4, 4)
    normalised = (pixels - 0.5) / 0.5  # Flower's examples: Normalize((0.5,), (0.5,))
    audit = LeakageAudit(lambda: net, lambda ctx: (normalised, torch.zeros(5)),
                         normalization=((0.5,), (0.5,)))
    images, _ = _unit_range_data(audit.data_fn, *audit.normalization)(None)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, pixels)
    model = _normalised_model(lambda: net, *audit.normalization)()
    assert set(model.state_dict()) == {"1.weight", "1.bias"}  # no new keys
    torch.testing.assert_close(model(images), torch.nn.Sequential(*net)(normalised))


def test_the_guard_turns_off_the_false_clipping_warning_under_dpsgd(monkeypatch) -> None:
    pytest.importorskip("torch")
    import flwr_guard.audit.audit_mod as audit_mod
    from flwr_guard.guard.client import LeakageAudit

    seen = {}
    monkeypatch.setattr(audit_mod, "leakage_audit_mod",
                        lambda model_fn, data_fn, config: seen.setdefault("config", config))
    LeakageAudit(lambda: None, lambda ctx: None).mod(dpsgd=True)
    assert seen["config"].check_update_norm is False
    seen.clear()
    LeakageAudit(lambda: None, lambda ctx: None).mod(dpsgd=False)
    assert seen["config"].check_update_norm is True


def test_the_node_operators_policy_applies_on_top_of_the_apps() -> None:
    # The app requires nothing; the node config (the operator's) requires SecAgg+.
    guard = ClientGuard(ClientPolicy())
    nodes = (11, 12)
    grid = LoopbackGrid({n: _app(guard.train_mods()) for n in nodes},
                        node_config={n: {"guard-require-secagg": True} for n in nodes})
    with pytest.raises(GuardMismatch, match=r"requires SecAgg\+"):
        GuardedStrategy(_fedavg(2)).start(grid, _initial(), num_rounds=1)
    assert _clear_updates(grid) == []
    merged = ClientPolicy(dp="any", max_clipping_norm=2.0).with_node_config(
        {"guard-require-dp": "distributed", "guard-max-clipping-norm": 1.0,
         "guard-min-noise-multiplier": 0.7})
    assert merged == ClientPolicy(secagg=True, dp="distributed", min_noise_multiplier=0.7,
                                  max_clipping_norm=1.0)
    with pytest.raises(ValueError, match="guard-require-secagg must be true or false"):
        ClientPolicy.from_node_config({"guard-require-secagg": 3})


def test_secagg_from_run_config_reads_the_reference_apps_keys_and_names_a_bad_one() -> None:
    import tomllib
    from pathlib import Path

    from flwr_guard.guard.strategy import GuardConfigError, SecAgg

    pyproject = Path(__file__).parent.parent / "src/flwr_guard/apps/digits/pyproject.toml"
    config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    secagg = SecAgg.from_run_config(config)
    assert secagg == SecAgg(num_shares=None, reconstruction_threshold=None, clipping_range=2.0,
                            quantization_range=65536, timeout=300.0, multi_round=True)
    assert SecAgg.from_run_config({**config, "secagg": False}) is None
    assert SecAgg.from_run_config({"secagg-num-shares": 5}) == SecAgg(num_shares=5)
    assert SecAgg.from_run_config({"secagg-max-colluders": 0}) == SecAgg(options={"max_colluders": 0})
    with pytest.raises(GuardConfigError, match="run config secagg-timeout = 'soon': expected float"):
        SecAgg.from_run_config({"secagg-timeout": "soon"})
    with pytest.raises(GuardConfigError, match="run config secagg-multi-round = 1: expected bool"):
        SecAgg.from_run_config({"secagg-multi-round": 1})
    with pytest.raises(GuardConfigError, match="secagg-reconstruction-threshold = -1: expected >= 0"):
        SecAgg.from_run_config({"secagg-reconstruction-threshold": -1})
