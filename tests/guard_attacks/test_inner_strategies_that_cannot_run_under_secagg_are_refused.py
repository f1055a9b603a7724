"""GuardedStrategy accepts inner strategies that cannot work under SecAgg+ and runs them
silently: a robust aggregator (median, Krum, trimmed mean) or Flower's own server-side DP
wrapper receives one reply, the masked sum, so the robustness / per-client clipping the
user chose is gone and the run ends 'fine' with a plain mean. The issue asks that
unsupported combinations raise at construction (Opacus-style)."""
import pytest
from flwr.serverapp import strategy as S

from flwr_guard.guard.strategy import GuardConfigError, GuardedStrategy, SecAgg

KW = dict(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)


@pytest.mark.parametrize("make", [
    lambda: S.FedMedian(**KW),
    lambda: S.Krum(num_malicious_nodes=1, **KW),
    lambda: S.MultiKrum(num_malicious_nodes=1, **KW),
    lambda: S.FedTrimmedAvg(**KW),
    lambda: S.Bulyan(num_malicious_nodes=0, **KW),
    lambda: S.DifferentialPrivacyServerSideFixedClipping(S.FedAvg(**KW), noise_multiplier=1.0,
                                                         clipping_norm=0.1, num_sampled_clients=4),
], ids=["FedMedian", "Krum", "MultiKrum", "FedTrimmedAvg", "Bulyan", "Flower-DP-server-side"])
def test_strategies_that_need_individual_updates_are_refused_with_secagg(make):
    try:
        inner = make()
    except TypeError as err:
        pytest.skip(f"constructor: {err}")
    with pytest.raises(GuardConfigError):
        GuardedStrategy(inner, secagg=SecAgg())
