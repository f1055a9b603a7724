"""DPFedAvg fed crafted replies: the noise std is z C / n for the *configured* n (never
a reply's weight), the clipped count must match, distributed mode refuses to run without
SecAgg+'s noise, accounting without amplification by default, Skellam's own RDP, and the
default checkpoint; plus the client's distributed-DP floors."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_guard.dp.accounting import Step, compute_epsilon, epsilon_of_steps
from flwr_guard.dp.distributed import quantised_l2_bound, skellam_mu
from flwr_guard.dp.distributed_client import distributed_dp_noise
from flwr_guard.dp.skellam_accounting import quantised_l1_bound
from flwr_guard.dp.strategy import AdaptiveClipping, DPConfigurationError, DPFedAvg
from flwr_guard.keys import ReplyMetrics

D = 200_000  # values in the model: the noise std is measured to ~0.3 %
Z, C, DELTA = 1.3, 0.5, 1e-5


class _Nodes(Grid):
    """The part of a Grid that a strategy's configure_train uses: the connected nodes."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self):  # type: ignore[override]
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id)

    run = property(lambda self: getattr(self, "_run", None))  # type: ignore[assignment]

    def set_run(self, run_id):  # type: ignore[override]
        raise NotImplementedError

    def get_nodes(self):  # type: ignore[override]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[override]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        raise NotImplementedError


@pytest.fixture(autouse=True)
def server_process(tmp_path, monkeypatch):
    """Flower 1.41 creates messages only in a process with a task identity; FLWR_HOME
    points at a temporary directory (the default checkpoint goes there)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(D, np.float32))})


def _reply(msg: Message, update: np.ndarray, **metrics: float) -> Message:
    arrays = ArrayRecord({"w": Array((np.zeros(D) + update).astype(np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": 1.0, ReplyMetrics.DP_CLIPPED_COUNT: 1, ReplyMetrics.DP_NOISED_COUNT: 0, ReplyMetrics.DP_UNCLIPPED_COUNT: 0, **metrics})})
    return Message(content=content, reply_to=msg)


def _round(dp: DPFedAvg, nodes: int, make_replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
    messages = list(dp.configure_train(1, _global(), ConfigRecord(), _Nodes(nodes)))
    return dp.aggregate_train(1, make_replies(messages))


def _dp(**kw) -> DPFedAvg:
    args = dict(noise_multiplier=Z, clipping_norm=C, expected_contributors=4, delta=DELTA,
                rng=np.random.default_rng(0), checkpoint=None)
    return DPFedAvg(FedAvg(min_available_nodes=1, min_train_nodes=1), **{**args, **kw})


def _std(arrays: ArrayRecord) -> float:
    return float(arrays.to_numpy_ndarrays()[0].astype(np.float64).std())


def test_central_noise_is_for_the_configured_denominator_whatever_replies_say() -> None:
    # Zero updates: the new model is the noise alone. 4 clients expected, 4 reply.
    dp = _dp()
    arrays, metrics = _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms])
    assert _std(arrays) == pytest.approx(Z * C / 4, rel=0.01)
    assert metrics["dp-noise-std"] == pytest.approx(Z * C / 4)
    assert "dp-contributors" not in metrics  # the realised count is not published

    # Only 2 of the 4 reply: the sum keeps noise z C and is divided by 4, not 2.
    dp = _dp()
    arrays, _ = _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms[:2]])
    assert _std(arrays) == pytest.approx(Z * C / 4, rel=0.01)


def test_a_single_reply_never_sets_the_denominator() -> None:
    # The old under-noising: one reply of weight 1000 (SecAgg+'s aggregate, or a client
    # without the clipping mod) set n = 1000 in z C / n. Now: a SecAgg+ aggregate whose
    # masked clipped count proves 1000 clipped contributors gets z C / 4 all the same.
    dp = _dp()
    arrays, _ = _round(dp, 4, lambda ms: [_reply(ms[0], 0.0, **{"num-examples": 1000.0,
                                                                ReplyMetrics.DP_CLIPPED_COUNT: 1000})])
    assert _std(arrays) == pytest.approx(Z * C / 4, rel=0.01)


def test_clipped_count_must_match_the_contributors_or_the_round_is_refused(caplog) -> None:
    def aggregate(clipped: int | None):
        def make(ms):
            r = _reply(ms[0], 0.0, **{"num-examples": 1000.0})
            if clipped is None:
                del r.content["metrics"][ReplyMetrics.DP_CLIPPED_COUNT]
            else:
                r.content["metrics"][ReplyMetrics.DP_CLIPPED_COUNT] = clipped
            return [r]
        return make

    # 999 of 1000 contributors proved their clipping; no masked count at all.
    for clipped in (999, None):
        dp = _dp()
        with caplog.at_level(logging.WARNING):
            arrays, metrics = _round(dp, 4, aggregate(clipped))
        assert arrays is None and metrics is None and dp.epsilon == 0.0
    assert "proved their clipping" in caplog.text
    assert "masked_metrics=DPFedAvg.MASKED_METRICS" in caplog.text


def test_several_plain_replies_are_clipped_on_the_server_and_weigh_one() -> None:
    dp = _dp(rng=np.random.default_rng(1))
    # Two clients without the mod: huge updates, example weights 300.
    arrays, _ = _round(dp, 2, lambda ms: [_reply(m, 10.0, **{"num-examples": 300.0}) for m in ms])
    mean = float(arrays.to_numpy_ndarrays()[0].astype(np.float64).mean())
    # Each update clipped to C: every coordinate C / sqrt(D); their sum / 4.
    assert mean == pytest.approx(2 * C / math.sqrt(D) / 4, abs=3 * Z * C / 4 / math.sqrt(D))


def test_default_accounting_has_no_amplification_and_poisson_needs_a_rate() -> None:
    dp = _dp()
    _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms])
    assert dp.epsilon == pytest.approx(compute_epsilon(Z, 1.0, 1, DELTA), rel=1e-9)
    with pytest.raises(ValueError, match="explicit sample_rate"):
        _dp(sampling="poisson")
    dp = _dp(sampling="poisson", sample_rate=0.1)
    _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms])
    assert dp.epsilon == pytest.approx(compute_epsilon(Z, 0.1, 1, DELTA), rel=1e-9)
    with pytest.raises(ValueError, match="expected_contributors"):
        _dp(expected_contributors=None)


def test_distributed_without_secagg_noise_fails_at_the_first_round() -> None:
    dp = _dp(distributed=True, min_contributors=2, quantization_step=4 / 2**16)
    with pytest.raises(DPConfigurationError, match="no SecAgg\\+ layer adds the clients' noise"):
        _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms])
    # One aggregate without the masked counts: no proof of clipping and noise.
    dp = _dp(distributed=True, min_contributors=2, quantization_step=4 / 2**16)

    def aggregate(ms):
        r = _reply(ms[0], 0.0, **{"num-examples": 4.0})
        del r.content["metrics"][ReplyMetrics.DP_NOISED_COUNT]
        return [r]
    with pytest.raises(DPConfigurationError, match="MASKED_METRICS"):
        _round(dp, 4, aggregate)
    # Noised count short of the contributors (a client added no noise): refused.
    dp = _dp(distributed=True, min_contributors=2, quantization_step=4 / 2**16)
    arrays, _ = _round(dp, 4, lambda ms: [_reply(ms[0], 0.0, **{
        "num-examples": 4.0, ReplyMetrics.DP_CLIPPED_COUNT: 4, ReplyMetrics.DP_NOISED_COUNT: 3})])
    assert arrays is None and dp.epsilon == 0.0
    for bad in ({"sampling": "poisson", "sample_rate": 0.3},
                {"adaptive": AdaptiveClipping()}, {"quantization_step": None}):
        with pytest.raises(ValueError, match="amplification|adaptive clipping|quantization_step"):
            _dp(distributed=True, min_contributors=2,
                **{"quantization_step": 4 / 2**16, **bad})


def test_distributed_round_is_accounted_with_skellams_own_rdp() -> None:
    step, m, n = 4 / 2**16, 2, 3
    dp = _dp(distributed=True, min_contributors=m, quantization_step=step, relation="zero-out")
    arrays, metrics = _round(dp, 4, lambda ms: [_reply(ms[0], 0.0, **{
        "num-examples": float(n), ReplyMetrics.DP_CLIPPED_COUNT: n, ReplyMetrics.DP_NOISED_COUNT: n})])
    assert arrays is not None and metrics["dp-noise-std"] == 0.0  # the clients noised
    l2 = quantised_l2_bound(C, step, D)
    mu = n * skellam_mu(Z, C, step, D, m)
    expected = epsilon_of_steps(
        [Step(Z * math.sqrt(n / m), 1.0, 1, skellam=(l2, quantised_l1_bound(l2, D), mu))],
        DELTA, "rdp", "none")
    assert dp.epsilon == pytest.approx(expected, rel=1e-9)
    gaussian = compute_epsilon(Z * math.sqrt(n / m), 1.0, 1, DELTA, sampling="none")
    assert gaussian < dp.epsilon < gaussian * 1.05  # Skellam costs a little more


def test_adaptive_clipping_noises_centred_bits_with_the_norm_sent() -> None:
    dp = _dp(adaptive=AdaptiveClipping(count_stddev=1.0), clipping_norm=1.0)
    # 4 clients, all unclipped (zero updates): centred sum 4 * (1 - 1/2) = 2.
    arrays, metrics = _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms])
    # Replay the strategy's generator: the update noise (z_delta C / 4), then the count's.
    z_delta = (Z ** -2 - 2.0 ** -2) ** -0.5
    rng = np.random.default_rng(0)
    rng.normal(0.0, z_delta * 1.0 / 4, (D,))
    estimate = (2.0 + rng.normal(0.0, 1.0)) / 4 + 0.5
    assert metrics["dp-noise-std"] == pytest.approx(z_delta / 4)
    assert metrics["dp-clipping-norm"] == 1.0  # the noise used the norm sent this round
    assert dp.clipping_norm == pytest.approx(math.exp(-0.2 * (estimate - 0.5)), rel=1e-9)


def test_checkpoint_by_default_and_one_warning_where_it_cannot_write(tmp_path, monkeypatch,
                                                                     caplog) -> None:
    from flwr.supercore.run import Run

    def grid(federation: str, app: str) -> _Nodes:
        nodes = _Nodes(4)
        nodes._run = Run.create_empty(1)
        nodes._run.federation_id, nodes._run.fab_id = federation, app
        return nodes

    dp = _dp(checkpoint="auto")
    with caplog.at_level(logging.INFO):
        messages = list(dp.configure_train(1, _global(), ConfigRecord(), grid("fed-a", "pub/app-x")))
    dp.aggregate_train(1, [_reply(m, 0.0) for m in messages])
    path = tmp_path / "flwr-home" / "flwr-guard" / "dpfedavg" / "fed-a" / "pub__app-x" / "privacy.json"
    assert path.exists() and f"user-level privacy ledger {path}" in caplog.text
    restarted = _dp(checkpoint="auto")
    restarted.bind_checkpoint(grid("fed-a", "pub/app-x"))
    assert dp.epsilon > 0 and restarted.epsilon == pytest.approx(dp.epsilon)
    # Another app, or another federation, in the same Flower home has its own budget.
    for other in (grid("fed-a", "pub/app-y"), grid("fed-b", "pub/app-x")):
        fresh = _dp(checkpoint="auto")
        fresh.bind_checkpoint(other)
        assert fresh.epsilon == 0.0
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("FLWR_HOME", str(blocked))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        memory = _dp(checkpoint="auto")
        memory.bind_checkpoint(grid("fed-a", "pub/app-x"))
    assert memory.budget.checkpoint is None
    assert caplog.text.count("cannot write the privacy checkpoint") == 1


# -- the client's own floors (distributed DP) -------------------------------------------

ROUND = dict(weight=1, cohort_size=10, update_length=1000, clipping_range=2.0,
             quantization_range=2**16, modulus_bits=32)
CONFIG = {"dp-noise-multiplier": 1.0, "dp-clipping-norm": 1.0, "dp-min-contributors": 5,
          "dp-quantization-step": 4 / 2**16}


def test_client_refuses_a_server_asking_for_less_noise() -> None:
    node = {"dp-min-noise-multiplier": 0.8, "dp-honest-contributors": 5}
    metrics: dict = {ReplyMetrics.DP_NOISED_COUNT: 0}
    noise = distributed_dp_noise(CONFIG, node, metrics=metrics, **ROUND)
    mu = skellam_mu(1.0, 1.0, 4 / 2**16, 1000, 5)
    assert noise.dtype == np.int64 and metrics[ReplyMetrics.DP_NOISED_COUNT] == 1
    assert noise.var() == pytest.approx(2 * mu, rel=0.15)
    for bad, match in (({"dp-noise-multiplier": 0.0}, "below this node's floor"),
                       ({"dp-noise-multiplier": 0.5}, "below this node's floor"),
                       ({"dp-min-contributors": 10**6}, "assumes at most 5 honest"),
                       ({"dp-min-contributors": 6}, "assumes at most 5 honest"),
                       ({"dp-quantization-step": 1e-3}, "quantisation step")):
        metrics = {ReplyMetrics.DP_NOISED_COUNT: 0}
        with pytest.raises(ValueError, match=match):
            distributed_dp_noise({**CONFIG, **bad}, node, metrics=metrics, **ROUND)
        assert metrics[ReplyMetrics.DP_NOISED_COUNT] == 0
    # No request means no noise (the guard's policy mod refuses it if the node requires DP).
    assert distributed_dp_noise({}, {}, metrics={}, **ROUND) is None
    # A node that requires distributed DP refuses a round that asks for none.
    with pytest.raises(ValueError, match="noise multiplier 0.0, below this node's floor"):
        distributed_dp_noise({}, {**node, "guard-require-dp": "distributed"}, metrics={}, **ROUND)


def test_a_node_with_empty_node_config_refuses_zero_noise_and_unbounded_contributors() -> None:
    """Library defaults: z >= 0.5, at most 3 honest contributors (SecAgg+'s own default
    cohort floor), whatever the server's run config asks for."""
    from flwr_guard.dp.node_policy import DEFAULT_HONEST_CONTRIBUTORS
    from flwr_guard.secagg.policy import SecAggPolicy

    assert DEFAULT_HONEST_CONTRIBUTORS == SecAggPolicy().min_cohort
    ok = {**CONFIG, "dp-noise-multiplier": 0.5, "dp-min-contributors": 3}
    metrics: dict = {}
    assert distributed_dp_noise(ok, {}, metrics=metrics, **ROUND) is not None
    assert metrics[ReplyMetrics.DP_NOISED_COUNT] == 1
    for bad, match in (
        ({"dp-noise-multiplier": 0.0}, "noise multiplier 0.0, below this node's floor "
                                       "dp-min-noise-multiplier=0.5"),
        ({"dp-noise-multiplier": 0.3}, "below this node's floor dp-min-noise-multiplier=0.5"),
        ({"dp-noise-multiplier": "none"}, "without a numeric 'dp-noise-multiplier'"),
        ({"dp-noise-multiplier": float("nan")}, "below this node's floor"),
        ({"dp-min-contributors": 4}, "assumes at most 3 honest ones \\(dp-honest-contributors=3"),
        ({"dp-min-contributors": 10**6}, "assumes at most 3 honest"),
    ):
        metrics = {}
        with pytest.raises(ValueError, match=match):
            distributed_dp_noise({**ok, **bad}, {}, metrics=metrics, **ROUND)
        assert ReplyMetrics.DP_NOISED_COUNT not in metrics
    # A server that announces distributed DP but drops the noise multiplier gets 0: refused.
    announced = {k: v for k, v in ok.items() if k != "dp-noise-multiplier"}
    with pytest.raises(ValueError, match="noise multiplier 0.0, below"):
        distributed_dp_noise({**announced, "dp-distributed": True}, {}, metrics={}, **ROUND)
    # The operator may trust more honest clients, or accept less noise, explicitly.
    node = {"dp-honest-contributors": 10, "dp-min-noise-multiplier": 0.3}
    assert distributed_dp_noise({**ok, "dp-noise-multiplier": 0.3, "dp-min-contributors": 10},
                                node, metrics={}, **ROUND) is not None


def test_the_user_level_floor_has_one_key_and_a_deprecated_alias(caplog) -> None:
    from flwr_guard.dp.node_policy import min_noise_multiplier
    from flwr_guard.guard.policy import ClientPolicy

    assert min_noise_multiplier({}) == 0.5
    assert min_noise_multiplier({"dp-min-noise-multiplier": 0.8}) == 0.8
    with caplog.at_level("WARNING"):
        assert min_noise_multiplier({"guard-min-noise-multiplier": 0.9,
                                     "dp-min-noise-multiplier": 0.8}) == 0.9
    assert "guard-min-noise-multiplier is deprecated: use dp-min-noise-multiplier" in caplog.text
    with pytest.raises(ValueError, match="node config dp-min-noise-multiplier must be a number"):
        min_noise_multiplier({"dp-min-noise-multiplier": "lots"})
    # The guard's policy reads the same key, with the same default.
    assert ClientPolicy.from_node_config({"guard-require-dp": "central"}).min_noise_multiplier == 0.5
    policy = ClientPolicy.from_node_config({"guard-require-dp": "central",
                                            "dp-min-noise-multiplier": 1.5})
    assert policy.min_noise_multiplier == 1.5


def test_secure_central_noise_is_integer_skellam_on_a_lattice() -> None:
    from flwr_guard.dp.central import central_skellam_parameters

    dp = _dp(secure_noise=True, rng=np.random.default_rng(5))
    arrays, metrics = _round(dp, 4, lambda ms: [_reply(m, 0.0) for m in ms])
    step, skellam = central_skellam_parameters(Z, C, D)
    released = arrays.to_numpy_ndarrays()[0].astype(np.float64) * 4 / step
    # float32 storage of the model rounds the lattice points; the relative error is 1e-7.
    assert np.abs(released - np.round(released)).max() < 1e-7 * np.abs(released).max() + 1e-3
    assert _std(arrays) == pytest.approx(Z * C * 1.001 / 4, rel=0.01)
    assert metrics["dp-noise-std"] == pytest.approx(Z * C * 1.001 / 4, rel=1e-6)
    expected = epsilon_of_steps([Step(Z, 1.0, 1, skellam=skellam)], DELTA, "rdp", "none")
    assert dp.epsilon == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="secure_noise"):
        _dp(secure_noise=True, accountant="pld")
