"""The node guard without a deployment: allow-list, FAB signatures, the app's process
boundary, the guard's chain around an app, Flower's pinned internals."""

from __future__ import annotations

import io
import json
import sys
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from flwr_guard.guard.client_mod import POLICY_REFUSAL
from flwr_guard.node.allowlist import FAB_REFUSAL, AllowList, AllowListError, fab_hash
from flwr_guard.node.app_process import APP_FAILED, app_node_config, run_app
from flwr_guard.node.fab_signature import (
    SIGNATURE_FILE,
    FabSignatureError,
    load_private_key,
    sign_app_dir,
    verify_fab,
    write_private_key,
)
from flwr_guard.node.flower_pins import check_flower
from flwr_guard.node.policy import NodePolicy
from flwr_guard.node.round_log import LINE_PREFIX, STATE_RECORD
from flwr_guard.node.runner import chain, handle
from flwr_guard.node.superexec import GuardedExecutor

PLAIN = FIXTURES / "quickstart" / "plain"
PROBE = FIXTURES / "node_guard" / "probe"
APP_GUARD = FIXTURES / "node_guard" / "app_guard"


def test_flower_internals_the_guard_relies_on_are_as_pinned() -> None:
    assert check_flower().startswith("1.41.")


# -- allow-list and signatures --------------------------------------------------------
@pytest.fixture(scope="module")
def plain_fab() -> bytes:
    return build_fab_from_disk(PLAIN)


def test_a_pinned_fab_is_allowed_and_any_other_is_refused_with_the_fix(plain_fab) -> None:
    digest = fab_hash(plain_fab)
    assert AllowList.from_node_config({"guard-fab-hashes": digest}).check(plain_fab) is None
    other = AllowList.from_node_config({"guard-fab-hashes": "0" * 64})
    reason = other.check(plain_fab)
    assert reason is not None and digest in reason and "guard-fab-hashes" in reason


def test_no_allow_list_refuses_every_app_unless_the_operator_allows_any(plain_fab) -> None:
    reason = AllowList.from_node_config({}).check(plain_fab)
    assert reason is not None and "has no FAB allow-list" in reason and "guard-fab-allow-any" in reason
    assert AllowList.from_node_config({"guard-fab-allow-any": True}).check(plain_fab) is None


def test_allow_list_file_and_bad_values_name_the_key(tmp_path, plain_fab) -> None:
    path = tmp_path / "allow.toml"
    path.write_text(f'fab-hashes = ["{fab_hash(plain_fab)}"]\n')
    assert AllowList.from_node_config({"guard-fab-allowlist": str(path)}).check(plain_fab) is None
    with pytest.raises(AllowListError, match="guard-fab-hashes: 'abc' is not 64 hex digits"):
        AllowList.from_node_config({"guard-fab-hashes": "abc"})
    path.write_text("fab-hashes = [")
    with pytest.raises(AllowListError, match="guard-fab-allowlist=.* cannot be read"):
        AllowList.from_node_config({"guard-fab-allowlist": str(path)})
    path.write_text('pins = ["x"]\n')
    with pytest.raises(AllowListError, match=r"unknown keys \['pins'\]"):
        AllowList.from_node_config({"guard-fab-allowlist": str(path)})


@pytest.fixture()
def signed_app(tmp_path):
    import shutil

    app = tmp_path / "app"
    shutil.copytree(PLAIN, app, ignore=shutil.ignore_patterns("__pycache__"))
    key = tmp_path / "publisher.key"
    public = write_private_key(key)
    sign_app_dir(app, load_private_key(key))
    return app, public


def test_a_signed_fab_verifies_under_its_trusted_key_only(signed_app, tmp_path) -> None:
    app, public = signed_app
    fab = build_fab_from_disk(app)  # what `flwr run APP` sends: the signature inside
    assert SIGNATURE_FILE in zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert verify_fab(fab, frozenset({public})).public_key == public
    allow = AllowList.from_node_config({"guard-fab-trusted-keys": public})
    assert allow.check(fab) is None
    stranger = write_private_key(tmp_path / "stranger.key")
    reason = AllowList.from_node_config({"guard-fab-trusted-keys": stranger}).check(fab)
    assert reason is not None and "a key this node does not trust" in reason


def test_a_signed_app_changed_after_signing_is_refused(signed_app) -> None:
    app, public = signed_app
    client = app / "quickstart" / "client_app.py"
    client.write_text(client.read_text() + "\nLEAK = True\n")
    with pytest.raises(FabSignatureError, match="does not verify"):
        verify_fab(build_fab_from_disk(app), frozenset({public}))


def test_a_fab_with_a_file_its_manifest_omits_is_refused(signed_app) -> None:
    app, public = signed_app
    fab = build_fab_from_disk(app)
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(buffer, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("quickstart/sitecustomize.py", "print('unlisted')")
    with pytest.raises(FabSignatureError, match="files its manifest does not list"):
        verify_fab(buffer.getvalue(), frozenset({public}))
    unsigned = build_fab_from_disk(PLAIN)
    with pytest.raises(FabSignatureError, match=f"carries no {SIGNATURE_FILE}"):
        verify_fab(unsigned, frozenset({public}))


# -- the app's process boundary ---------------------------------------------------------
def _probe_fab(app_dir=PROBE, fab_id: str = "flwr-guard-tests/probe") -> tuple[Fab, Run]:
    content = build_fab_from_disk(app_dir)
    fab = Fab(fab_hash(content), content, {})
    run = Run.create_empty(run_id=7)
    run.fab_id, run.fab_version, run.fab_hash = fab_id, "1.0.0", fab.hash_str
    return fab, run


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None


def _train_message(arrays: ArrayRecord, config: dict | None = None) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config or {})})
    msg = Message(content=content, dst_node_id=5, message_type="train", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    msg.metadata.__dict__["_run_id"] = 7
    return msg


def _context(state: RecordDict | None = None, **node_config) -> Context:
    return Context(run_id=7, node_id=5, node_config={"partition-id": 0, **node_config},
                   state=state or RecordDict(), run_config={"mode": "echo"})


def test_the_app_runs_in_another_process_and_never_sees_the_guards_records_or_keys(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    fab, run = _probe_fab()
    state = RecordDict({"flwr-guard.secagg": ConfigRecord({"signing-secret": b"\x01" * 32}),
                        "app:counter": ConfigRecord({"n": 1})})
    context = _context(state, **{"secagg-signing-key": "/keys/node.key", "guard-require-dp": "distributed"})
    msg = _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]))
    result = run_app(msg, context, run, fab)
    assert result.exit_code == 0 and not result.reply.has_error(), result.reply
    seen = json.loads(result.reply.content.config_records["seen"]["json"])
    # What the app saw: its own record (without the prefix), a node config without the
    # guard's keys, and a process that is not the guard's.
    assert seen["state"] == ["counter"]
    assert seen["node_config"] == ["dp-sgd-ledger", "partition-id"]  # the ledger: a copy
    assert seen["pid"] != __import__("os").getpid()
    assert seen["guard_modules"] == []  # nothing of the guard's policy or SecAgg+ imported
    # The app's state came back under the prefix; the guard's record is untouched.
    assert context.state.config_records["app:counter"]["n"] == 2
    assert bytes(context.state.config_records["flwr-guard.secagg"]["signing-secret"]) == b"\x01" * 32
    # The reply answers the message (metadata rebuilt by the guard, not the app).
    assert result.reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert result.reply.metadata.dst_node_id == msg.metadata.src_node_id


def test_an_app_process_that_dies_yields_an_error_reply_not_a_crash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    fab, run = _probe_fab()
    context = _context()
    context.run_config["mode"] = "exit"
    result = run_app(_train_message(ArrayRecord([np.ones(3, dtype=np.float32)])), context, run, fab)
    assert result.exit_code == 3
    assert result.reply.has_error() and result.reply.error.reason.startswith(APP_FAILED)
    assert "exit code 3" in result.reply.error.reason


def _owned_node_config(ledgers) -> dict:
    """A node config with every key the node's policy owns, and keys the app keeps."""
    from flwr_guard.keys import NodeConfig

    owned = {NodeConfig.GUARD_FAB_HASHES: "x", NodeConfig.GUARD_REQUIRE_DP: "distributed",
             NodeConfig.SECAGG_ROSTER: "/keys/roster.toml", NodeConfig.SECAGG_SIGNING_KEY: "/keys/node.key",
             NodeConfig.DP_MIN_NOISE_MULTIPLIER: 1.0, NodeConfig.GUARD_MIN_NOISE_MULTIPLIER: 1.0,
             NodeConfig.DP_HONEST_CONTRIBUTORS: 2, NodeConfig.DP_SGD_LEDGER: str(ledgers)}
    kept = {"partition-id": 0, NodeConfig.DP_SGD_MAX_EPSILON: 3.0,
            NodeConfig.DP_SGD_MIN_NOISE_MULTIPLIER: 1.0, NodeConfig.DP_SGD_DATA_SOURCE: "digits-0"}
    return {**owned, **kept}


def test_app_node_config_drops_every_key_the_node_policy_owns(tmp_path) -> None:
    config = _owned_node_config(tmp_path / "ledgers")
    assert app_node_config(config) == {"partition-id": 0, "dp-sgd-max-epsilon": 3.0,
                                       "dp-sgd-min-noise-multiplier": 1.0,
                                       "dp-sgd-data-source": "digits-0"}


def _ledger_run(tmp_path, monkeypatch, mode: str):
    from flwr_guard.dp.record_ledger import RecordLedger, init_ledger

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    ledgers = tmp_path / "ledgers"
    init_ledger(ledgers, "digits-0")
    node = RecordLedger(ledgers, "digits-0")
    node.reserve(1.0, 0.01, 100)  # the node's earlier spending
    fab, run = _probe_fab()
    context = _context(**_owned_node_config(ledgers))
    context.run_config["mode"] = mode
    result = run_app(_train_message(ArrayRecord([np.ones(3, dtype=np.float32)])), context, run, fab)
    return result, RecordLedger(ledgers, "digits-0"), ledgers


def test_the_app_never_sees_the_nodes_private_config_nor_its_ledgers_location(tmp_path, monkeypatch) -> None:
    result, ledger, ledgers = _ledger_run(tmp_path, monkeypatch, "echo")
    assert not result.reply.has_error(), result.reply.error
    seen = json.loads(result.reply.content.config_records["seen"]["json"])
    assert seen["node_config"] == ["dp-sgd-data-source", "dp-sgd-ledger", "dp-sgd-max-epsilon",
                                   "dp-sgd-min-noise-multiplier", "partition-id"]
    # dp-sgd-ledger names a copy, not the node's directory; the copy is gone afterwards.
    assert seen["ledger_dir"] != str(ledgers) and not __import__("os").path.exists(seen["ledger_dir"])
    assert ledger.history == [(1.0, 0.01, 100)]


def test_steps_the_app_reserves_in_its_copy_reach_the_nodes_ledger(tmp_path, monkeypatch) -> None:
    result, ledger, _ = _ledger_run(tmp_path, monkeypatch, "ledger-reserve")
    assert not result.reply.has_error(), result.reply.error
    assert ledger.history == [(1.0, 0.01, 100), (1.5, 0.02, 10)]


def test_an_app_that_resets_its_ledger_copy_is_refused_and_the_nodes_ledger_is_kept(
        tmp_path, monkeypatch) -> None:
    from flwr_guard.dp.record_ledger import RecordLedger, init_ledger
    from flwr_guard.node.app_config import LEDGER_REFUSAL

    result, ledger, ledgers = _ledger_run(tmp_path, monkeypatch, "ledger-reset")
    assert result.reply.has_error() and LEDGER_REFUSAL in result.reply.error.reason
    assert "sends nothing" in result.reply.error.reason
    assert ledger.history == [(1.0, 0.01, 100)]
    # Positive control: the same reset on the node's own ledger (what an app that is
    # given the ledger's location can do) forgets the spending.
    init_ledger(ledgers, "digits-0", force=True)
    assert RecordLedger(ledgers, "digits-0").history == []


def test_a_missing_node_ledger_is_refused_naming_the_nodes_directory(tmp_path) -> None:
    from flwr_guard.dp.record_ledger import LedgerMissing, RecordLedger
    from flwr_guard.node.app_config import LedgerHandout

    handout = LedgerHandout({"dp-sgd-ledger": str(tmp_path / "node"), "dp-sgd-data-source": "s"})
    with pytest.raises(LedgerMissing) as err:  # what the app's DP-SGD raises on its copy
        RecordLedger(handout.node_config["dp-sgd-ledger"], "s")
    reason = handout.reason(str(err.value))
    assert f"flwr-guard ledger init --dir {tmp_path / 'node'} --source s" in reason
    assert handout.take_back() is None and not (tmp_path / "node").exists()


# -- the guard's chain around an app (the app here is in-process, a stand-in) -------------
def _echo_app(extra: RecordDict | None = None):
    def app(msg: Message, context: Context) -> Message:
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 10})})
        for name, record in (extra or RecordDict()).items():
            content[name] = record
        return Message(content=content, reply_to=msg)
    return app


def test_a_plain_train_message_is_refused_by_the_default_node_policy(caplog) -> None:
    fab, run = Fab("0" * 64, b"", {}), Run.create_empty(7)
    msg = _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]))
    called = []

    def app(m: Message, c: Context) -> Message:
        called.append(m)
        return _echo_app()(m, c)

    caplog.set_level("INFO", logger="flwr_guard.node")
    reply = handle(msg, _context(**{"guard-fab-allow-any": True}), run, fab, app=app)
    assert reply.has_error() and reply.error.reason.startswith(POLICY_REFUSAL)
    assert "requires SecAgg+" in reply.error.reason or "no protection manifest" in reply.error.reason
    assert called == []  # the app never ran: nothing to send
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(LINE_PREFIX)]
    assert len(lines) == 1 and "refused: " in lines[0] and "policy " in lines[0]


def test_with_secagg_off_by_the_operator_a_reply_with_an_extra_record_is_blocked() -> None:
    fab, run = Fab("0" * 64, b"", {}), Run.create_empty(7)
    msg = _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]))
    ctx = _context(**{"guard-fab-allow-any": True, "guard-require-secagg": False})
    assert not handle(msg, ctx, run, fab, app=_echo_app()).has_error()  # positive control
    leaky = _echo_app(RecordDict({"raw-data": ArrayRecord([np.arange(64, dtype=np.float32)])}))
    reply = handle(msg, _context(**{"guard-fab-allow-any": True, "guard-require-secagg": False}),
                   run, fab, app=leaky)
    assert reply.has_error()
    assert "raw-data" in reply.error.reason or "more than one ArrayRecord" in reply.error.reason


def test_a_fab_off_the_allow_list_and_a_query_are_refused_before_the_app_runs() -> None:
    fab, run = Fab(fab_hash(b"x"), b"x", {}), Run.create_empty(7)
    msg = _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]))
    reply = handle(msg, _context(), run, fab, app=lambda m, c: pytest.fail("the app ran"))
    assert reply.has_error() and FAB_REFUSAL in reply.error.reason
    query = Message(content=RecordDict(), dst_node_id=5, message_type="query")
    query.metadata.__dict__["_message_id"] = query.object_id
    reply = handle(query, _context(**{"guard-fab-allow-any": True}), run, fab,
                   app=lambda m, c: pytest.fail("the app ran"))
    assert reply.has_error() and "answers only train and evaluate" in reply.error.reason


def test_the_guards_superexec_launches_the_runner_with_the_token_on_stdin_only() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec

    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1",
                         token="secret-token", insecure=True, root_certificates_path=None,
                         runtime_dependency_install=False, parent_pid=42, suppress_output=False,
                         task_id=1)
    executor = GuardedExecutor()
    argv = executor.command(spec)
    assert argv[:3] == [sys.executable, "-m", "flwr_guard.node.runner"]
    assert "--token-stdin" in argv and "secret-token" not in " ".join(argv)
    assert executor.get_eligible_capacity(set(TaskType)) == ({TaskType.CLIENT_APP}, set())
    other = ExecutionSpec(**{**spec.__dict__, "task_type": TaskType.AGENT_APP})
    assert executor.launch(other).status == "failed"


def test_the_round_line_says_what_the_node_enforced_once_per_round() -> None:
    from flwr_guard.node.round_log import round_log_mod
    from flwr_guard.secagg import codec

    lines: list[str] = []
    mod = round_log_mod("abcd", emit=lines.append)
    context = _context()

    def stage(name: str, payload: dict, config: dict | None = None) -> Message:
        content = RecordDict({"secagg": ConfigRecord({"stage": name, "payload": codec.encode(payload)})})
        if config is not None:
            content["config"] = ConfigRecord(config)
        msg = Message(content=content, dst_node_id=5, message_type="train", group_id="4")
        msg.metadata.__dict__["_message_id"] = msg.object_id
        return msg

    def ok(msg: Message, ctx: Context) -> Message:
        return Message(content=RecordDict({"metrics": MetricRecord({"dp-sgd-epsilon": 0.5})}), reply_to=msg)

    mod(stage("masked-input", {}, {"dp-noise-multiplier": 1.1, "dp-clipping-norm": 1.0,
                                    "dp-distributed": True}), context, ok)
    assert lines == []  # the round is not over for this node yet
    mod(stage("consistency", {}), context, ok)
    mod(stage("unmask", {"active": [1, 2, 3]}), context, ok)
    assert lines == ["flwr-guard node round 4 (run 7): policy abcd; sent masked; SecAgg+ survivors 3; "
                     "noise distributed z=1.1 C=1; epsilon record-level 0.5; audit not run"]
    # a session round with a proven culprit: its recovery stage writes the round's second
    # line, the survivors less the culprit
    mod(stage("unmask-recover", {"evidence": {"3": {}}}), context, ok)
    assert lines[1] == ("flwr-guard node round 4 (run 7): policy abcd; recovery: 1 proven culprit(s) "
                        "left out of the sum; SecAgg+ survivors 2; noise none; epsilon n/a (record-level "
                        "DP-SGD needs the app); audit not run")
    assert STATE_RECORD not in context.state.config_records  # nothing kept after it
    # a refused recovery says so; the next round starts a record of its own
    mod(stage("unmask", {"active": [1, 2, 3]}), context, ok)

    def refuse(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=0, reason="SecAgg+ recovery refused: no proof"), reply_to=msg)

    mod(stage("unmask-recover", {"evidence": {"2": {}}}), context, refuse)
    assert lines[-1].startswith("flwr-guard node round 4 (run 7): policy abcd; refused: SecAgg+ "
                                "recovery refused: no proof; SecAgg+ survivors 3;")


def test_the_node_exporter_carries_the_round_line(tmp_path) -> None:
    import subprocess

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    script = ("from flwr_guard.telemetry.node import record_guard_round\n"
              "record_guard_round('7', {'verdict': 'sent masked', 'policy': 'abcd', 'survivors': 3,"
              " 'noise': 'distributed z=1.1 C=1', 'epsilon': 0.5})\n")
    env = {**__import__("os").environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    # the recovery stage's second line of the round: survivors updated, the round not
    # counted again, the noise gauge kept
    subprocess.run([sys.executable, "-c", script.replace("'survivors': 3", "'survivors': 2").replace(
        "'noise': 'distributed z=1.1 C=1'", "'noise': 'none'").replace("})", "}, count_round=False)")],
        env=env, check=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry).decode()
    assert 'flwr_guard_node_guard_rounds_total{policy="abcd",run="7",verdict="sent-masked"} 1.0' in text
    assert 'flwr_guard_node_guard_secagg_survivors{run="7"} 2.0' in text
    assert 'flwr_guard_node_guard_noise_multiplier{run="7"} 1.1' in text
    assert 'flwr_guard_clientapp_dp_record_epsilon{run="7"} 0.5' in text


def test_node_start_pairs_a_process_isolated_supernode_with_the_guards_superexec(tmp_path) -> None:
    from flwr_guard.node.launch import guarded_commands, write_secret

    secret = write_secret(tmp_path)
    assert secret.stat().st_mode & 0o077 == 0  # readable by its owner only
    supernode, superexec = guarded_commands(
        ["--insecure", "--superlink", "127.0.0.1:8000", "--port", "9999"], secret)
    assert supernode[0] == "flower-supernode"
    assert supernode[-4:] == ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    assert superexec[1:3] == ["-m", "flwr_guard.node.superexec"]
    assert "127.0.0.1:9999" in superexec and str(secret) in superexec
    with pytest.raises(ValueError, match="sets --isolation process itself"):
        guarded_commands(["--isolation", "subprocess"], secret)


# -- the app's own ClientGuard under the node guard ------------------------------------
def _secagg_manifest_message() -> Message:
    """A train message as the app sees it under the node guard: the model and a manifest
    that announces SecAgg+, without the protocol record (the node's SecAgg+ mod took it)."""
    from flwr_guard.guard.manifest import MANIFEST_KEY, ProtectionManifest, SecAggTerms

    manifest = ProtectionManifest(("secagg",), secagg=SecAggTerms(None, None, 2.0, 2**16))
    return _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]),
                          {MANIFEST_KEY: manifest.to_json()})


def test_the_apps_own_guard_leaves_secagg_to_the_node_guard_and_refuses_without_it(
        tmp_path, monkeypatch) -> None:
    from flwr_guard.node.enforcement import NodeEnforcement

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    fab, run = _probe_fab(APP_GUARD, "flwr-guard-tests/app-guard")
    msg = _secagg_manifest_message()
    # Under the node guard, for a message the node masks: the app guard does not refuse,
    # and its update goes (in the clear, inside the node) to the guard, which masks it.
    masked = NodeEnforcement(secagg_masked=True, policy="abcd")
    result = run_app(msg, _context(), run, fab, enforcement=masked)
    assert not result.reply.has_error(), result.reply.error
    update = result.reply.content.array_records["arrays"].to_numpy_ndarrays()[0]
    np.testing.assert_array_equal(update, np.full(3, 2.0, dtype=np.float32))
    # Positive controls: without the marker (an unguarded node), and under a node guard
    # that does not mask this message (the operator turned SecAgg+ off), the app's own
    # guard refuses: nothing is sent in the clear.
    for enforcement in (None, NodeEnforcement(secagg_masked=False, policy="abcd")):
        result = run_app(msg, _context(), run, fab, enforcement=enforcement)
        assert result.reply.has_error() and result.reply.error.reason.startswith(POLICY_REFUSAL)
        assert "the global model came in a plain train message" in result.reply.error.reason


def test_a_server_cannot_set_the_marker_through_run_config_message_or_environment(
        tmp_path, monkeypatch) -> None:
    from flwr_guard.guard.client import ClientGuard
    from flwr_guard.guard.policy import ClientPolicy
    from flwr_guard.node.enforcement import NodeEnforcement, node_enforcement

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    forged = NodeEnforcement(secagg_masked=True, policy="abcd").to_bytes().decode()
    names = ("flwr-guard-node-enforcement", "node-enforcement", "secagg_masked", "secagg-masked",
             "guard-node-enforced", "FLWR_GUARD_NODE_ENFORCEMENT")
    for name in names:
        monkeypatch.setenv(name.upper().replace("-", "_"), forged)
    msg = _secagg_manifest_message()
    for name in names:
        msg.content["config"][name] = forged
    context = _context(**dict.fromkeys(names, forged))
    context.run_config.update(dict.fromkeys(names, forged))
    # In the app's child process (as on a node whose guard sends no marker) ...
    fab, run = _probe_fab(APP_GUARD, "flwr-guard-tests/app-guard")
    result = run_app(msg, context, run, fab)
    assert result.reply.has_error(), "a forged marker switched the app guard off"
    assert "the global model came in a plain train message" in result.reply.error.reason
    # ... and in this process, as an unguarded node's flwr-clientapp runs the app.
    assert node_enforcement() is None
    mods = ClientGuard(ClientPolicy(secagg=True)).train_mods()
    reply = chain(mods, _echo_app())(msg, context)
    assert reply.has_error() and "the global model came in a plain train message" in reply.error.reason


def test_the_guard_tells_the_app_only_a_masked_input_stage_is_masked_by_the_node() -> None:
    from flwr_guard.node.enforcement import NodeEnforcement
    from flwr_guard.node.policy import NodePolicy
    from flwr_guard.node.runner import enforcement_for

    policy = NodePolicy.from_node_config({"guard-fab-allow-any": True})
    plain = _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]))
    assert enforcement_for(plain, policy) == NodeEnforcement(False, policy.digest())
    staged = _train_message(ArrayRecord([np.ones(3, dtype=np.float32)]))
    staged.content["secagg"] = ConfigRecord({"stage": "masked-input", "payload": b""})
    assert enforcement_for(staged, policy) == NodeEnforcement(True, policy.digest())
    assert NodeEnforcement.from_bytes(NodeEnforcement(True, "ab").to_bytes()) == NodeEnforcement(True, "ab")
    with pytest.raises(ValueError, match="enforcement frame is not version 1"):
        NodeEnforcement.from_bytes(b'{"version": 0}')


# -- the structural trap check on the received model ------------------------------------
def _models() -> dict:
    """The honest models of tests/test_audit_trap.py's false-positive tests, and an
    imprint planted in the MLP (Fowl et al.)."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from flwr_guard.audit.imprint import plant_imprint
    from flwr_guard.models.digits_cnn import DigitsCNN

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    public = torch.tensor(load_digits().data[1400:] / 16.0, dtype=torch.float32)
    models = {"digits-cnn": DigitsCNN().state_dict(), "digits-mlp": mlp.state_dict(),
              "tabular-mlp": nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3)).state_dict(),
              "imprint": plant_imprint(mlp.state_dict(), "1", "3", public)}
    return {name: ArrayRecord(state) for name, state in models.items()}


def test_the_node_refuses_an_imprint_model_before_the_app_trains_and_passes_honest_ones(caplog) -> None:
    fab, run = Fab("0" * 64, b"", {}), Run.create_empty(7)
    config = {"guard-fab-allow-any": True, "guard-require-secagg": False}
    trained: list[str] = []

    def app(name: str):
        def call(m: Message, c: Context) -> Message:
            trained.append(name)
            return Message(content=RecordDict({"arrays": m.content["arrays"],
                                               "metrics": MetricRecord({"num-examples": 10})}),
                           reply_to=m)
        return call

    caplog.set_level("INFO", logger="flwr_guard.node")
    models = _models()
    for name in ("digits-cnn", "digits-mlp", "tabular-mlp"):
        reply = handle(_train_message(models[name]), _context(**config), run, fab, app=app(name))
        assert not reply.has_error(), (name, reply.error)
    assert trained == ["digits-cnn", "digits-mlp", "tabular-mlp"]
    reply = handle(_train_message(models["imprint"]), _context(**config), run, fab, app=app("imprint"))
    assert reply.has_error() and reply.error.reason.startswith(f"{POLICY_REFUSAL} received model refused:")
    assert "64 rows of '1.weight' (64, 64) share one direction" in reply.error.reason
    assert "guard-trap-check" in reply.error.reason
    assert "imprint" not in trained  # refused before the app ran
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(LINE_PREFIX)]
    assert "refused: flwr-guard policy refused: received model refused:" in lines[-1]
    # Positive control: with the check off the app trains on the imprint model.
    off = _context(**config, **{"guard-trap-check": False})
    assert not handle(_train_message(models["imprint"]), off, run, fab, app=app("imprint")).has_error()
    assert trained[-1] == "imprint"
    with pytest.raises(ValueError, match="guard-trap-check must be true or false"):
        NodePolicy.from_node_config({"guard-trap-check": "maybe"})


def test_steps_of_an_app_whose_node_ledger_vanished_meanwhile_are_refused_not_dropped(tmp_path) -> None:
    from flwr_guard.dp.record_ledger import RecordLedger, init_ledger, ledger_path
    from flwr_guard.node.app_config import LEDGER_REFUSAL, LedgerHandout

    node = {"dp-sgd-ledger": str(tmp_path / "node"), "dp-sgd-data-source": "s"}
    init_ledger(tmp_path / "node", "s")
    handout = LedgerHandout(node)
    RecordLedger(handout.node_config["dp-sgd-ledger"], "s").reserve(1.0, 0.1, 5)  # the app
    ledger_path(tmp_path / "node", "s").unlink()  # deleted while the app ran
    reason = handout.take_back()
    assert reason is not None and reason.startswith(LEDGER_REFUSAL)
    assert "cannot be recorded" in reason and "is missing" in reason
    # Positive control: with the node's ledger in place the same steps are recorded.
    init_ledger(tmp_path / "node", "s")
    handout = LedgerHandout(node)
    RecordLedger(handout.node_config["dp-sgd-ledger"], "s").reserve(1.0, 0.1, 5)
    assert handout.take_back() is None
    assert RecordLedger(tmp_path / "node", "s").history == [(1.0, 0.1, 5)]


def test_an_apps_error_text_leaves_the_node_cut_to_a_bounded_printable_reason() -> None:
    # An error reply passes every policy mod unchecked: an app that raises with its data
    # in the message would otherwise send that data to the server in the clear.
    from flwr.app import Error

    from flwr_guard.node.app_process import MAX_APP_REASON_CHARS

    secret = "x" * 1_000_000 + "\u00e9\x00"
    message = Message(content=RecordDict({"arrays": ArrayRecord([np.ones(3, dtype=np.float32)]),
                                          "config": ConfigRecord({})}),
                      dst_node_id=5, message_type="evaluate", group_id="1")
    message.metadata.__dict__["_message_id"] = message.object_id

    def app(m: Message, c: Context) -> Message:
        return Message(Error(code=1, reason=secret), reply_to=m)

    # Positive control: the app's own reply carries the whole text.
    assert len(app(message, _context()).error.reason) == len(secret)
    reply = handle(message, _context(**{"guard-fab-allow-any": True}), Run.create_empty(7),
                   Fab("0" * 64, b"", {}), app=app)
    assert reply.has_error()
    assert len(reply.error.reason) <= MAX_APP_REASON_CHARS
    assert reply.error.reason.endswith("...") and reply.error.reason.isascii()


@pytest.mark.parametrize("history", [[[1.0, 0.01, 5], [2.0, 0.01, -3]], [[float("nan"), 0.01, 5]]])
def test_ledger_steps_the_ledger_refuses_are_a_refusal_not_a_crash(tmp_path, history) -> None:
    from flwr_guard.dp.record_ledger import RecordLedger, init_ledger, ledger_path
    from flwr_guard.node.app_config import LEDGER_REFUSAL, LedgerHandout

    init_ledger(tmp_path, "s")
    handout = LedgerHandout({"dp-sgd-ledger": str(tmp_path), "dp-sgd-data-source": "s"})
    copy = ledger_path(handout.copy_dir, "s")
    data = json.loads(copy.read_text())
    data["history"] = history
    copy.write_text(json.dumps(data))
    refused = handout.take_back(1)
    assert refused is not None and refused.startswith(LEDGER_REFUSAL)
    assert RecordLedger(tmp_path, "s").history == []  # the node's ledger is left as it was
