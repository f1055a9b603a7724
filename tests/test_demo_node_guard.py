"""The demo's node-guard settings, without a deployment (the deployment runs in
tests/test_demo_deployment.py, guarded by default)."""

from __future__ import annotations

from conftest import FIXTURES
from flwr.cli.build import build_fab_from_disk

from flwr_guard.apps.digits import app_dir
from flwr_guard.demo import DemoOptions, demo_node_guard_config
from flwr_guard.node.allowlist import AllowList, fab_hash


def test_the_demo_pins_the_app_it_submits_and_nothing_else() -> None:
    config = demo_node_guard_config(app_dir(), {}, {})
    assert config == {"guard-fab-hashes": fab_hash(build_fab_from_disk(app_dir())),
                      "guard-require-secagg": True}
    allow = AllowList.from_node_config(config)
    assert allow.check(build_fab_from_disk(app_dir())) is None
    other = build_fab_from_disk(FIXTURES / "quickstart" / "plain")
    reason = allow.check(other)
    assert reason is not None and "is not on this node's allow-list" in reason


def test_an_operators_own_allow_list_and_secagg_choice_are_kept() -> None:
    config = demo_node_guard_config(app_dir(), {"guard-fab-allow-any": True,
                                                "guard-require-secagg": True}, {"secagg": False})
    assert config == {}
    assert demo_node_guard_config(app_dir(), {"guard-fab-hashes": "0" * 64}, {"secagg": False}) == {
        "guard-require-secagg": False}


def test_the_node_guard_is_the_demos_default() -> None:
    assert DemoOptions().node_guard is True
