"""SecAgg+ client policy from node config, the federation roster file, centered_lift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flwr_guard.secagg import crypto
from flwr_guard.secagg.keys import load_signing_key, write_signing_key
from flwr_guard.secagg.params import (
    ROSTER_TABLE_SIZES,
    colluders_for,
    roster_defaults,
    roster_defaults_table,
)
from flwr_guard.secagg.policy import (
    Roster,
    RosterMember,
    load_roster,
    policy_from_node_config,
)
from flwr_guard.secagg.quantization import centered_lift


def _roster(tmp_path, n=3):
    members = tuple(RosterMember(write_signing_key(tmp_path / f"k{i}"), f"node{i}") for i in range(n))
    return Roster(members)


def test_signed_roster_loads_and_an_altered_or_unsigned_one_is_refused(tmp_path) -> None:
    admin_secret, admin_public = crypto.ed25519_keypair()
    roster = _roster(tmp_path)
    path = tmp_path / "roster.json"
    roster.to_file(path, admin_secret)
    assert set(load_roster(path, admin_public).members) == set(roster.members)
    data = json.loads(path.read_text())
    data["members"][0]["signing-key"] = crypto.ed25519_keypair()[1].hex()  # a Sybil slipped in
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="administrator signature does not verify"):
        load_roster(path, admin_public)
    roster.to_file(path)  # unsigned
    with pytest.raises(ValueError, match="is not signed"):
        load_roster(path, admin_public)
    assert set(load_roster(path).members) == set(roster.members)  # no admin key configured: the file is the trust root


def test_toml_roster_and_node_config_policy(tmp_path) -> None:
    key = write_signing_key(tmp_path / "me")
    assert len(load_signing_key(tmp_path / "me")) == 32
    with pytest.raises(FileExistsError):
        write_signing_key(tmp_path / "me")  # a node's key is never replaced silently
    toml = tmp_path / "roster.toml"
    toml.write_text(f'[[members]]\nname = "a"\nsigning-key = "{key.hex()}"\nnode-id = 5\n')
    policy = policy_from_node_config({"secagg-roster": str(toml), "secagg-min-cohort": 4,
                                      "secagg-corrupt-fraction": "0.1"})
    assert policy.roster.members[0].node_id == 5 and policy.min_cohort == 4
    assert policy.corrupt_fraction == 0.1 and not policy.trust_on_first_use
    assert policy_from_node_config({}, simulation=True).trust_on_first_use
    assert not policy_from_node_config({}).trust_on_first_use
    for config, match in [
        ({"secagg-roster-admin-key": "00" * 32}, "no secagg-roster"),
        ({"secagg-roster": str(tmp_path / "missing.json")}, "cannot read"),
        ({"secagg-trust-on-first-use": "maybe"}, "true or false"),
        ({"secagg-corrupt-fraction": "nan"}, "finite"),
        ({"secagg-corrupt-fraction": "1.5"}, r"\[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            policy_from_node_config(config)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"members": [{"signing-key": "zz"}]}))
    with pytest.raises(ValueError, match="not hex"):
        load_roster(bad)
    bad.write_text(json.dumps({"members": [{"signing-key": key.hex()}, {"signing-key": key.hex()}]}))
    with pytest.raises(ValueError, match="twice"):
        load_roster(bad)


def test_centered_lift_keeps_exact_sums_at_the_modulus_edge_and_flags_wraparounds() -> None:
    bits = 32
    top = 2**32 - 2  # W L just below the modulus: a legal, exact sum range
    exact = np.array([0, 1, top // 2, top - 1, top], dtype=np.int64)
    values, suspected = centered_lift(exact, top // 2, bits)
    assert values.tolist() == exact.tolist() and suspected == 0
    # With a small honest range a wrapped coordinate (a negative sum taken mod 2^32) is
    # far from it, and is flagged.
    center = 1000
    residues = np.array([0, 2000, (2**32 - 5) % 2**32, 2**31], dtype=np.int64)
    values, suspected = centered_lift(residues, center, bits)
    assert values.tolist()[:3] == [0, 2000, -5] and suspected == 1


def test_colluder_bound_and_session_cap_from_node_config(tmp_path) -> None:
    roster = tmp_path / "roster.json"
    _roster(tmp_path, n=41).to_file(roster)
    policy = policy_from_node_config({"secagg-roster": str(roster)})
    # C = ceil(0.05 x 41) = 3; sums of C + 1 + 2 = 6; sessions of 100 rounds, 24 h.
    assert (policy.colluders, policy.honest_others, policy.min_sum) == (3, 2, 6)
    assert (policy.max_session_rounds, policy.max_session_seconds) == (100, 86_400.0)
    policy = policy_from_node_config({
        "secagg-roster": str(roster), "secagg-max-colluders": "5", "secagg-min-honest-others": 3,
        "secagg-max-session-rounds": "20", "secagg-max-session-seconds": "3600",
    })
    assert (policy.colluders, policy.min_sum) == (5, 9)
    assert (policy.max_session_rounds, policy.max_session_seconds) == (20, 3600.0)
    assert "secagg-max-colluders=5" in policy.colluders_source()
    for config, match in [
        ({"secagg-max-colluders": "-1"}, "max_colluders must be >= 0"),
        ({"secagg-max-colluders": "two"}, "secagg-max-colluders must be a number"),
        ({"secagg-min-honest-others": "0"}, "min_honest_others must be >= 1"),
        ({"secagg-max-session-rounds": "0"}, r"max_session_rounds must be in \[1, 10000\]"),
        ({"secagg-max-session-rounds": "20000"}, r"max_session_rounds must be in \[1, 10000\]"),
        ({"secagg-max-session-seconds": "inf"}, "finite"),
        ({"secagg-max-session-seconds": "0"}, "max_session_seconds must be finite and > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            policy_from_node_config(config)


def test_colluders_are_ceil_gamma_times_roster_size_exactly() -> None:
    assert [colluders_for(r) for r in (1, 3, 20, 21, 40, 41, 100, 1000)] == [1, 1, 1, 2, 2, 3, 5, 50]
    assert colluders_for(40, 0.1) == 4 and colluders_for(30, 0.1) == 3 and colluders_for(10, 0.0) == 0


def test_the_defaults_table_in_the_docs_is_the_codes() -> None:
    """docs/secagg.md, "Defaults by roster size": the rows between the markers are what
    roster_defaults_table() prints, and each row's t meets 2t > k + c with c = the
    corrupt neighbours for C = ceil(0.05 R) and the sum floor C + 3."""
    text = (Path(__file__).parents[1] / "docs" / "secagg.md").read_text()
    begin, end = "<!-- roster-defaults:begin -->\n", "\n<!-- roster-defaults:end -->"
    documented = text[text.index(begin) + len(begin): text.index(end)]
    assert documented == roster_defaults_table()
    assert ROSTER_TABLE_SIZES[0] == 3 and ROSTER_TABLE_SIZES[-1] == 1000
    for size in ROSTER_TABLE_SIZES:
        d = roster_defaults(size)
        assert d.min_sum == d.colluders + 3
        if d.choice is None:
            assert size < d.min_sum
            continue
        k, t, c = d.choice.num_shares, d.choice.reconstruction_threshold, d.choice.corrupt_neighbours
        assert 2 * t > k + c and t > c and t <= k
        assert d.choice.security_failure <= 2.0**-40
