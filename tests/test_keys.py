"""flwr_guard.keys is the one place a config key or metric name is spelled.

- every key a docs key table lists exists in the class of its role (node config, run
  config, reply metrics), and every run-config and node-config key is in such a table;
- no module under src/flwr_guard outside keys.py holds a string literal that is, or
  starts, a key: no re-spelled key, no key built from a prefix (SecAgg+'s own wire
  vocabulary, stage and record names, is in secagg/constants.py). Each exception is
  listed with its reason.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from flwr_guard.keys import NodeConfig, ReplyMetrics, RunConfig, ServerMetrics, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "flwr_guard"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLASSES = (RunConfig, NodeConfig, TrainConfig, ReplyMetrics, ServerMetrics)

#: A literal that is a key, or the start of one (``"dp-"``, ``"robust-acc-"``).
KEY_LITERAL = re.compile(r"^(dp|guard|audit|robust|metrics|secagg|inspector)-[a-z0-9.-]*$")
#: Literals that match KEY_LITERAL but are no config key or metric name:
#: (module under src/flwr_guard, literal) -> (occurrences, reason).
NOT_KEYS = {
    ("cli.py", "audit-endpoints"): (1, "a CLI command name"),
    ("audit/cli.py", "audit-report"): (1, "the default output directory"),
    ("audit/sweep.py", "dp-1"): (1, "a protection setting's name in the sweep grid"),
    ("audit/sweep.py", "secagg-4"): (1, "a protection setting's name in the sweep grid"),
    ("audit/sweep.py", "secagg-16"): (1, "a protection setting's name in the sweep grid"),
    ("audit/sweep.py", "dp-0.001"): (1, "a protection setting's name in the sweep grid"),
    ("audit/sweep.py", "dp-0.01"): (1, "a protection setting's name in the sweep grid"),
    ("audit/sweep.py", "dp-0.1"): (1, "a protection setting's name in the sweep grid"),
    ("dp/record_ledger.py", "dp-sgd-ledger"): (1, "the default ledger directory's name"),
    ("demo.py", "dp-sgd-ledger"): (1, "the demo's ledger directory's name"),
    ("demo.py", "secagg-"): (1, "prefix of a temporary directory"),
    ("demo.py", "dp-epsilon-record"): (1, "a label of a Prometheus query in the demo summary"),
    ("demo.py", "secagg-surviving-clients"): (1, "a label of a Prometheus query in the demo summary"),
    ("demo.py", "robust-pgd-accuracy-0.1"): (1, "a label of a Prometheus query in the demo summary"),
    ("deployment/provision.py", "secagg-"): (1, "prefix of a signing-key file name"),
    ("guard/manifest.py", "audit-summary"): (1, "a protection name in the manifest"),
    ("guard/strategy.py", "audit-summary"): (1, "a protection name in the manifest"),
    ("node/policy.py", "dp-sgd"): (1, "a field of the policy description the digest covers"),
}
#: Keys of keys.py that no docs table lists, with the reason.
UNDOCUMENTED = {
    NodeConfig.PARTITION_ID: "Flower's own node config (simulation); docs name it as the data source's default",
    NodeConfig.DP_SGD_LEDGER_RESET: "retired: refused with a message naming `flwr-guard ledger init --force`",
}


def constants(cls: type) -> dict[str, str]:
    """``{name: key}`` of a keys class (prefixes, which end in ``-``, left out)."""
    return {name: value for name, value in vars(cls).items()
            if name.isupper() and isinstance(value, str) and not value.endswith("-")}


def key_tables() -> list[tuple[str, type, list[str]]]:
    """``(where, class, keys)`` of every docs table whose first header cell names a key.

    The role comes from the header ("node config ...") or, for a plain ``key`` column,
    from the lines before the table ("metric keys", "run config").
    """
    tables = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("|"):
                i += 1
                continue
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            header = lines[i].split("|")[1].strip().lower()
            if "key" in header or header == "node config":
                where = f"{path.relative_to(ROOT)}:{i + 1}"
                before = " ".join(lines[max(0, i - 6):i]).lower()
                heading = next((line.lower() for line in reversed(lines[:i]) if line.startswith("#")), "")
                if "node" in header:
                    role: type = NodeConfig
                elif "metric keys" in before:
                    role = ReplyMetrics
                elif re.search(r"run[- ]config", before + " " + heading):
                    role = RunConfig
                else:
                    raise AssertionError(f"{where}: a key table whose role (node config, run config, "
                                         "metric keys) the lines before it do not say")
                keys = [key for row in lines[i + 2:end]
                        for key in re.findall(r"`([a-z][a-z0-9-]*)`", row.split("|")[1])]
                tables.append((where, role, keys))
            i = end
    return tables


def reference_app_keys() -> set[str]:
    """The reference app's own run-config keys (declared in its pyproject.toml)."""
    data = tomllib.loads((SRC / "apps" / "digits" / "pyproject.toml").read_text())
    return set(data["tool"]["flwr"]["app"]["config"])


def test_the_key_classes_cannot_be_instantiated():
    for cls in CLASSES:
        with pytest.raises(TypeError, match=f"^{cls.__name__} cannot be instantiated.$"):
            cls()


def test_keys_are_lowercase_kebab_case_and_one_name_per_key_within_a_class():
    for cls in CLASSES:
        keys = constants(cls)
        assert keys, cls.__name__
        for name, key in keys.items():
            assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", key), (cls.__name__, name, key)
        twice = [key for key, n in Counter(keys.values()).items() if n > 1]
        assert not twice, (cls.__name__, twice)


def test_a_key_in_several_roles_is_the_same_constant_in_each():
    # The train config copies run-config keys; a node-config key the run config may also
    # set is one string: renaming it in one class renames it in the other.
    assert TrainConfig.DP_CLIPPING_NORM == RunConfig.DP_CLIPPING_NORM == ServerMetrics.DP_CLIPPING_NORM
    assert TrainConfig.DP_NOISE_MULTIPLIER == RunConfig.DP_NOISE_MULTIPLIER
    assert NodeConfig.DP_SGD_MAX_EPSILON == RunConfig.DP_SGD_MAX_EPSILON
    assert NodeConfig.SECAGG_MAX_COLLUDERS == RunConfig.SECAGG_MAX_COLLUDERS
    # Dynamic metric names are built in keys.py only.
    assert ServerMetrics.robust_accuracy("pgd", 0.1) == "robust-acc-pgd-0.1"
    assert ServerMetrics.robust_accuracy("none", 0) == ServerMetrics.ROBUST_ACCURACY_CLEAN
    assert ServerMetrics.robust_attribution("saliency", "faithfulness") == "robust-attr-saliency-faithfulness"


def test_every_key_a_docs_table_lists_is_a_key_of_its_role():
    tables = key_tables()
    assert {role for _, role, _ in tables} == {NodeConfig, RunConfig, ReplyMetrics}, tables
    app_keys = reference_app_keys()
    unknown = []
    for where, role, keys in tables:
        known = set(constants(role).values())
        if where.startswith("docs/reference-app.md"):
            known |= app_keys  # the reference app's own settings (rounds, batch size, ...)
        unknown += [f"{where}: {key} (not in {role.__name__})" for key in keys if key not in known]
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("cls", [RunConfig, NodeConfig], ids=lambda c: c.__name__)
def test_every_run_and_node_config_key_is_in_a_docs_table(cls):
    documented = {key for _, role, keys in key_tables() if role is cls for key in keys}
    missing = [f"{name} = {key!r}" for name, key in constants(cls).items()
               if key not in documented and key not in UNDOCUMENTED]
    assert not missing, f"add to a {cls.__name__} table in the docs: {missing}"
    assert set(UNDOCUMENTED) <= set(constants(NodeConfig).values()) - documented


def key_literals_in(source: str) -> list[str]:
    """The key-like string literals of Python ``source`` (f-string parts included)."""
    return [node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY_LITERAL.match(node.value)]


def key_literals() -> Counter[tuple[str, str]]:
    """``(module, literal)`` -> occurrences of key-like string literals in
    src/flwr_guard, outside keys.py."""
    found: Counter[tuple[str, str]] = Counter()
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module != "keys.py":
            found.update((module, literal) for literal in key_literals_in(path.read_text()))
    return found


def test_no_module_spells_a_key_outside_the_keys_module():
    found = key_literals()
    spelled = {f"{module}: {literal!r} x{n}" for (module, literal), n in found.items()
               if NOT_KEYS.get((module, literal), (0, ""))[0] != n}
    assert not spelled, ("use the constant of flwr_guard.keys (or list a literal that is no key in "
                         f"NOT_KEYS with its reason): {sorted(spelled)}")
    stale = set(NOT_KEYS) - set(found)
    assert not stale, f"NOT_KEYS entries no longer in the code: {sorted(stale)}"


def test_the_literal_scan_finds_a_re_spelled_key_and_a_prefix():
    # Positive control: the scan catches a re-spelled key and a concatenation prefix, in
    # plain and f-strings; prose and constants pass.
    source = ('x = {"dp-clipping-norm": 1}\ny = cfg.get("dp-" + k)\nz = f"robust-acc-{a}-{e:g}"\n'
              'w = cfg.get(RunConfig.DP_DELTA)\nmsg = "dp-sgd-delta must be in (0, 1)"')
    assert sorted(key_literals_in(source)) == ["dp-", "dp-clipping-norm", "robust-acc-"]
