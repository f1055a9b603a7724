"""Hostile manifest documents: each must be a ManifestError (a policy refusal), never
another exception out of the mod."""
import json

import pytest
from flwr.app import ConfigRecord, RecordDict
from guard_attack_helpers import app, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard import ClientPolicy, ManifestError, ProtectionManifest
from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.client_mod import POLICY_REFUSAL
from flwr_guard.guard.manifest import MANIFEST_KEY, MAX_MANIFEST_BYTES

GOOD = {"version": 1, "protections": ["reply-guard"], "secagg": None, "dp": None}


def test_deeply_nested_json_is_a_manifest_error():
    text = "[" * (MAX_MANIFEST_BYTES - 10)
    with pytest.raises(ManifestError):
        ProtectionManifest.parse(text)


def test_deeply_nested_manifest_is_a_policy_refusal_not_a_crash():
    grid = LoopbackGrid({11: app(ClientGuard(ClientPolicy(dp="central")).train_mods())})
    content = RecordDict({"arrays": initial(),
                          "config": ConfigRecord({MANIFEST_KEY: "[" * (MAX_MANIFEST_BYTES - 10)})})
    [reply] = grid.send_and_receive([grid.create_message(content, "train", 11, "1")])
    assert reply.has_error()
    assert reply.error.reason.startswith(POLICY_REFUSAL), reply.error.reason


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(version):
    with pytest.raises(ManifestError):
        ProtectionManifest.parse(json.dumps({**GOOD, "version": version}))


@pytest.mark.parametrize("value", [b"{}", ["x"], 3.5, True, "x" * 10**6])
def test_wrong_types_and_huge_values_are_refused(value):
    with pytest.raises(ManifestError):
        ProtectionManifest.parse(value)
