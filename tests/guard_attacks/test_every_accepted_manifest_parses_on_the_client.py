"""Whatever GuardedStrategy accepts at construction, its manifest must parse on the
client (else every client refuses at round 1 instead of the server failing at start)."""
import math

import pytest
from flwr.serverapp.strategy import FedAvg

from flwr_guard.guard import ProtectionManifest
from flwr_guard.guard.strategy import CentralDP, DistributedDP, GuardedStrategy, SecAgg

CASES = {
    "z=0": dict(dp=CentralDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=0.0, clipping_norm=1.0)),
    "z=inf": dict(dp=CentralDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=math.inf, clipping_norm=1.0)),
    "C=nan": dict(dp=CentralDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=1.0, clipping_norm=math.nan)),
    "L=2^33": dict(secagg=SecAgg(quantization_range=2**33)),
    "L=1": dict(secagg=SecAgg(quantization_range=1)),
    "r=inf": dict(secagg=SecAgg(clipping_range=math.inf)),
    "k=0": dict(secagg=SecAgg(num_shares=0)),
    "ddp-min0": dict(secagg=SecAgg(), dp=DistributedDP(expected_contributors=3, options={'checkpoint': None}, noise_multiplier=1.0, clipping_norm=1.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_accepted_configuration_has_a_parseable_manifest(name):
    try:
        strategy = GuardedStrategy(FedAvg(), **CASES[name])
    except (ValueError, TypeError):
        return  # refused at construction: fine
    assert ProtectionManifest.parse(strategy.manifest.to_json()) == strategy.manifest
