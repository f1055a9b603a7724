"""Hostile dp-clipping-norm values in the train config (these held up when run)."""
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from guard_attack_helpers import app, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy, ProtectionManifest
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.manifest import MANIFEST_KEY, DPTerms

MANIFEST = ProtectionManifest(("central-dp", "update-clipping"), dp=DPTerms("central", 1.0, 0.5)).to_json()


@pytest.mark.parametrize("policy", [ClientPolicy(dp="central", max_clipping_norm=1.0),
                                    ClientPolicy(dp="central")], ids=["with-max", "no-max"])
@pytest.mark.parametrize("value", ["0.5", True, [0.5], -1.0, 0.0, math.inf, math.nan, 5.0, b"\x00"],
                         ids=repr)
def test_hostile_clipping_norm_never_gives_an_update_above_the_limit(policy, value):
    grid = LoopbackGrid({11: app(ClientGuard(policy).train_mods(), step=1.0)})
    content = RecordDict({"arrays": initial(), "config": ConfigRecord(
        {MANIFEST_KEY: MANIFEST, "dp-clipping-norm": value})})
    [reply] = grid.send_and_receive([grid.create_message(content, "train", 11, "1")])
    if reply.has_error():
        return
    norm = float(np.linalg.norm(reply.content["arrays"]["w"].numpy()))
    limit = policy.max_clipping_norm or float(value)  # no max: the server's C, as coerced by the clipping mod
    assert norm <= limit * 1.0001, (value, norm)
