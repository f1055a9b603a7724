"""The app's process kept from the guard (``--app-isolation``): a hostile app (a real
ClientApp FAB, tests/fixtures/node_guard/escape) tries to read the guard's SuperExec
secret and to connect to a port of the guard's; under ``sandbox`` both fail, under
``process`` (positive control) both succeed. Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from flwr_guard.dp.record_ledger import RecordLedger, init_ledger
from flwr_guard.node.allowlist import fab_hash
from flwr_guard.node.app_process import run_app
from flwr_guard.node.isolation import (
    DEFAULT_APP_ID,
    AppIsolation,
    IsolationError,
    app_environment,
    parse_app_user,
    unreachable,
)
from flwr_guard.node.launch import guarded_commands, write_secret

ESCAPE = FIXTURES / "node_guard" / "escape"
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="starting the app as another user needs root "
                          "(CI runs as root; run these tests as root)")


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None


@pytest.fixture()
def guard_files():
    """The guard's secret as `flwr-guard node start` writes it (0600), in a directory
    every user may search (0755), so that only the file's own mode keeps the app out;
    a 0644 file beside it (what the app may read), and a listening port of the guard's."""
    # Not in the temporary directory: a sandboxed app gets a private one (tested below).
    directory = Path(tempfile.mkdtemp(prefix="flwr-guard-test-", dir="/var/tmp"))
    os.chmod(directory, 0o755)
    secret = write_secret(directory)
    public = directory / "public.txt"
    public.write_text("public")
    os.chmod(public, 0o644)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"guard")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield secret, public, server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()
    import shutil

    shutil.rmtree(directory)


def _escape(tmp_path, secret: Path, port: int, isolation: AppIsolation | None, monkeypatch,
            more: dict | None = None, node: dict | None = None) -> dict:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "guard-home"))
    monkeypatch.setenv("FLWR_MODEL_API_KEY", "guard-only-api-key")  # a secret in the guard's env
    init_ledger(tmp_path / "ledger", "default")
    RecordLedger(tmp_path / "ledger", "default").reserve(1.0, 0.01, 3)
    content = build_fab_from_disk(ESCAPE)
    fab = Fab(fab_hash(content), content, {})
    run = Run.create_empty(run_id=7)
    run.fab_id, run.fab_version, run.fab_hash = "flwr-guard-tests/escape", "1.0.0", fab.hash_str
    context = Context(run_id=7, node_id=5,
                      node_config={"dp-sgd-ledger": str(tmp_path / "ledger"), **(node or {})},
                      state=RecordDict(),
                      run_config={"secret-file": str(secret), "guard-port": port, **(more or {})})
    msg = Message(content=RecordDict({"arrays": ArrayRecord([np.ones(3, dtype=np.float32)]),
                                      "config": ConfigRecord({})}),
                  dst_node_id=5, message_type="train", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    msg.metadata.__dict__["_run_id"] = 7
    result = run_app(msg, context, run, fab, isolation=isolation)
    if node and "guard-app-timeout" in node:
        return {"reason": result.reply.error.reason if result.reply.has_error() else ""}
    assert result.exit_code == 0 and not result.reply.has_error(), result.reply
    return json.loads(result.reply.content.config_records["seen"]["json"])


@ROOT
def test_a_sandboxed_app_cannot_read_the_guards_secret_nor_reach_its_port(
        tmp_path, guard_files, monkeypatch) -> None:
    secret, public, port = guard_files
    isolation = AppIsolation.resolve("sandbox")
    seen = _escape(tmp_path, secret, port, isolation, monkeypatch)
    assert seen["uid"] == DEFAULT_APP_ID != os.geteuid() and seen["gid"] == DEFAULT_APP_ID
    assert seen["groups"] == []
    assert not seen["secret"]["ok"] and "PermissionError" in seen["secret"]["error"]
    assert not seen["connect"]["ok"] and "unreachable" in seen["connect"]["error"]
    assert seen["pid"] == 1  # its own PID namespace
    # Its ledger copy is its own (readable); its environment holds none of the guard's secrets.
    assert seen["ledger"]["ok"] and json.loads(seen["ledger"]["value"])["history"] == [[1.0, 0.01, 3]]
    assert "FLWR_MODEL_API_KEY" not in seen["env"]
    assert seen["flwr_home"].startswith(tempfile.gettempdir()) and seen["flwr_home"].endswith("/home")
    assert not os.path.exists(seen["flwr_home"])  # the workspace is removed afterwards
    # Its /tmp is private: only its own workspace, no other app's, none of the host's files;
    # what its interpreter needs from the host's /tmp (a checkout or venv there, as in a
    # fresh clone under /tmp) is bound in read-only.
    from flwr_guard.node.isolation import needed_paths

    tmpdir = os.path.realpath(tempfile.gettempdir())
    kept = {os.path.relpath(p, tmpdir).split("/")[0] for p in needed_paths()
            if p.startswith(tmpdir + "/")}
    assert sorted(seen["tmp"]) == sorted({Path(seen["flwr_home"]).parent.name, *kept})
    assert not any(name.startswith("pytest-of-") for name in seen["tmp"])  # the host's /tmp


@ROOT
def test_positive_control_the_same_app_as_the_guards_user_reads_the_secret_and_connects(
        tmp_path, guard_files, monkeypatch) -> None:
    secret, public, port = guard_files
    seen = _escape(tmp_path, secret, port, AppIsolation.resolve("process"), monkeypatch)
    assert seen["uid"] == os.geteuid()
    assert seen["secret"] == {"ok": True, "value": secret.read_text()}
    assert seen["connect"] == {"ok": True, "value": "guard"}
    assert "FLWR_MODEL_API_KEY" in seen["env"]
    assert len(seen["tmp"]) > 1  # the host's /tmp


@ROOT
def test_a_sandboxed_app_reads_a_file_every_user_may_read_beside_the_secret(
        tmp_path, guard_files, monkeypatch) -> None:
    # The secret is kept out by its mode (0600), not by an unreachable directory.
    secret, public, port = guard_files
    seen = _escape(tmp_path, public, port, AppIsolation.resolve("sandbox"), monkeypatch)
    assert seen["secret"] == {"ok": True, "value": "public"}


_IN_EXPOSED_NS = "FLWR_GUARD_TEST_EXPOSED_NS"


@ROOT
def test_user_isolation_runs_the_app_as_another_user_without_network_isolation(
        tmp_path, guard_files, monkeypatch) -> None:
    secret, _, port = guard_files
    try:
        isolation = AppIsolation.resolve("user")
    except IsolationError as err:
        # This host's Python is out of the app user's reach (e.g. under /root, 0700): the
        # start-up error names the directory and the fixes ...
        blocked = unreachable([os.path.realpath(sys.executable)], DEFAULT_APP_ID, DEFAULT_APP_ID)
        assert blocked and blocked[0].split(" ")[0] in str(err)
        assert "--app-isolation sandbox" in str(err) and "--app-isolation process" in str(err)
        assert not os.environ.get(_IN_EXPOSED_NS), err
        # ... and this test runs again in a mount namespace of its own where those
        # directories are reachable (as an operator who installs Python under /usr/local
        # would have them), exposed by the sandbox's own code: the guard stays root.
        from flwr_guard.node.isolation import needed_paths

        script = (
            "import os, sys, pytest\n"
            "from flwr_guard.node.sandbox_init import expose\n"
            f"expose({needed_paths()!r}, {DEFAULT_APP_ID}, {DEFAULT_APP_ID}, {str(tmp_path / 'stage')!r})\n"
            f"os.environ[{_IN_EXPOSED_NS!r}] = '1'\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:warnings', "
            f"{__file__ + '::test_user_isolation_runs_the_app_as_another_user_without_network_isolation'!r}]))\n")
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                               sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300, check=False, cwd=Path(__file__).parent)
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
        return
    seen = _escape(tmp_path, secret, port, isolation, monkeypatch)
    assert seen["uid"] == DEFAULT_APP_ID and seen["groups"] == []
    assert not seen["secret"]["ok"] and "PermissionError" in seen["secret"]["error"]
    assert seen["connect"] == {"ok": True, "value": "guard"}  # user keeps the host's network
    assert "FLWR_MODEL_API_KEY" not in seen["env"]


@ROOT
def test_sandbox_asked_for_without_the_capabilities_is_an_error_and_auto_falls_to_process() -> None:
    # The guard as root with an empty capability bounding set (a container with cap_drop ALL).
    script = ("from flwr_guard.node.isolation import AppIsolation, IsolationError\n"
              "print(AppIsolation.resolve('auto').describe())\n"
              "for level in ('sandbox', 'user'):\n"
              "    try:\n        AppIsolation.resolve(level)\n"
              "    except IsolationError as err:\n        print(err)\n")
    done = subprocess.run(["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--",
                           sys.executable, "-c", script], capture_output=True, text=True, check=True)
    auto, sandbox, user = done.stdout.strip().splitlines()
    assert auto.startswith("flwr-guard node: app isolation process (--app-isolation auto)")
    assert "run it as root for sandbox" in auto
    assert sandbox.startswith("--app-isolation sandbox needs the guard to run as root or with")
    assert "cap_add CHOWN, DAC_OVERRIDE, SETGID, SETUID, SYS_ADMIN" in sandbox
    assert "--app-isolation user" in sandbox
    assert "cap_add CHOWN, DAC_OVERRIDE, SETGID, SETUID" in user


@ROOT
def test_the_start_up_check_passes_for_sandbox_here() -> None:
    isolation = AppIsolation.resolve("auto")
    assert isolation.level == "sandbox"
    isolation.check()
    assert isolation.to_args() == ["--app-isolation", "sandbox", "--app-user",
                                   f"{DEFAULT_APP_ID}:{DEFAULT_APP_ID}"]


def test_app_user_forms_and_refusals() -> None:
    assert parse_app_user(None) == (DEFAULT_APP_ID, DEFAULT_APP_ID)
    assert parse_app_user("1234") == (1234, 1234)
    assert parse_app_user("1234:5678") == (1234, 5678)
    import pwd

    nobody = pwd.getpwnam("nobody")
    assert parse_app_user("nobody") == (nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(IsolationError, match="must not run as root"):
        parse_app_user("0")
    with pytest.raises(IsolationError, match="no such user or group"):
        parse_app_user("no-such-user-here")
    with pytest.raises(IsolationError, match="choose one of auto, sandbox, user, process"):
        AppIsolation.resolve("container")


def test_the_apps_environment_keeps_only_what_an_app_needs() -> None:
    env = app_environment({"PATH": "/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "OMP_NUM_THREADS": "2",
                           "FLWR_HOME": "/root/.flwr", "FLWR_MODEL_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s",
                           "HOME": "/root", "SSH_AUTH_SOCK": "/tmp/agent"}, "/w/home")
    assert env == {"PATH": "/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "OMP_NUM_THREADS": "2",
                   "HOME": "/w/home", "FLWR_HOME": "/w/home", "TMPDIR": "/w/home/tmp"}


def test_unreachable_names_a_directory_the_app_user_cannot_search(tmp_path) -> None:
    closed = tmp_path / "closed"
    (closed / "inside").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(closed, 0o700)
    found = unreachable([str(closed / "inside")], DEFAULT_APP_ID, DEFAULT_APP_ID)
    assert any(f.startswith(f"{closed} (mode 0700") for f in found)
    os.chmod(closed, 0o755)
    assert not any(f.startswith(str(closed)) for f in unreachable([str(closed / "inside")],
                                                                   DEFAULT_APP_ID, DEFAULT_APP_ID))


def test_node_start_hands_the_isolation_to_the_guards_superexec(tmp_path) -> None:
    supernode, superexec = guarded_commands(["--insecure"], tmp_path / "s",
                                            ["--app-isolation", "user", "--app-user", "4242"])
    assert superexec[-4:] == ["--app-isolation", "user", "--app-user", "4242"]
    assert "--app-isolation" not in supernode
    from flwr_guard.node.isolation import split_isolation_args

    assert split_isolation_args(["--insecure", "--app-isolation", "sandbox"]) == ("sandbox", None, ["--insecure"])


def test_the_files_the_guard_keeps_from_the_app_are_written_0600(tmp_path) -> None:
    from flwr_guard.dp.record_ledger import Reservation, ledger_path
    from flwr_guard.secagg.keys import write_federation

    assert os.stat(write_secret(tmp_path)).st_mode & 0o777 == 0o600
    init_ledger(tmp_path / "ledger", "s")
    RecordLedger(tmp_path / "ledger", "s").reserve(1.0, 0.1, 1)  # rewritten atomically
    assert os.stat(ledger_path(tmp_path / "ledger", "s")).st_mode & 0o777 == 0o600
    Reservation(tmp_path / "ledger", "s").release()
    assert os.stat(tmp_path / "ledger" / "s.reservation").st_mode & 0o777 == 0o600
    write_federation(tmp_path / "federation", 2, min_cohort=2)
    keys = [p for p in (tmp_path / "federation").rglob("*") if p.is_file() and "key" in p.name
            and not p.name.endswith(".pub")]
    assert keys and all(os.stat(p).st_mode & 0o777 == 0o600 for p in keys), keys
    with AppIsolation.resolve("process").workspace() as space:  # the app's workspace
        assert os.stat(space.top).st_mode & 0o777 == 0o700


@ROOT
def test_the_guards_superexec_refuses_to_start_with_an_isolation_it_cannot_have() -> None:
    done = subprocess.run(["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--",
                           sys.executable, "-m", "flwr_guard.node.superexec", "--insecure",
                           "--app-isolation", "sandbox"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "flwr-guard node superexec: --app-isolation sandbox needs the guard to run as root" in done.stderr
    assert "Starting Flower SuperExec" not in done.stderr + done.stdout  # nothing started


#: The app uid of the leftover tests: not DEFAULT_APP_ID, so that their kill sweeps never
#: reach another test session's apps on the same host.
_LEFTOVER_ID = 65531


def _user_isolation_or_rerun(tmp_path, test: str) -> AppIsolation | None:
    """``user`` isolation as uid :data:`_LEFTOVER_ID`; where this host's Python is out of
    that user's reach, ``None`` after running ``test`` again in a mount namespace where it
    is reachable (as in the test above; the guard stays root)."""
    from flwr_guard.node.isolation import needed_paths

    if not unreachable(needed_paths([tempfile.gettempdir()]), _LEFTOVER_ID, _LEFTOVER_ID):
        return AppIsolation("user", _LEFTOVER_ID, _LEFTOVER_ID, "user")
    assert not os.environ.get(_IN_EXPOSED_NS), "still unreachable in the exposed namespace"
    script = (
        "import os, sys, pytest\n"
        "from flwr_guard.node.sandbox_init import expose\n"
        f"expose({needed_paths()!r}, {_LEFTOVER_ID}, {_LEFTOVER_ID}, {str(tmp_path / 'stage')!r})\n"
        f"os.environ[{_IN_EXPOSED_NS!r}] = '1'\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:warnings', "
        f"{__file__ + '::' + test!r}]))\n")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                           sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False, cwd=Path(__file__).parent)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    return None


def _processes_of(uid: int) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                    fields = dict(line.split(":", 1) for line in status if ":" in line)
            except OSError:
                continue
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                out.append(f"{pid} {fields.get('Name', '').strip()} {fields.get('State', '').strip()}")
    return out


@ROOT
def test_under_user_nothing_the_app_leaves_behind_outlives_its_turn(
        tmp_path, guard_files, monkeypatch) -> None:
    """F4: a process the app left behind (its own session, as the app's uid) lived on and
    read the next app's memory (ptrace, same uid). Now every process of the app's uid is
    killed after each app. Positive control: the app did leave one (its pid is reported,
    and it was alive when the app answered)."""
    isolation = _user_isolation_or_rerun(
        tmp_path, "test_under_user_nothing_the_app_leaves_behind_outlives_its_turn")
    if isolation is None:
        return
    secret, _, port = guard_files
    assert _processes_of(_LEFTOVER_ID) == []
    seen = _escape(tmp_path, secret, port, isolation, monkeypatch, {"leave-behind": True})
    assert seen["uid"] == _LEFTOVER_ID and seen["leftover-pid"] > 0
    assert _processes_of(_LEFTOVER_ID) == []


def test_an_app_past_guard_app_timeout_is_killed_and_the_reply_names_the_key(
        tmp_path, guard_files, monkeypatch) -> None:
    """No app holds the ledger's reservation for ever: past node config
    ``guard-app-timeout`` it is killed and the reply is an error naming the key (and the
    ledger is taken back: the next handout does not wait)."""
    secret, _, port = guard_files
    seen = _escape(tmp_path, secret, port, None, monkeypatch, {"sleep-s": 120.0},
                   {"guard-app-timeout": 1})
    assert "the app ran longer than node config guard-app-timeout (1 s) and was killed" in seen["reason"]
    from flwr_guard.node.app_config import LedgerHandout

    LedgerHandout({"dp-sgd-ledger": str(tmp_path / "ledger")}, wait_s=0).take_back()
    bad = _escape(tmp_path / "b", secret, port, None, monkeypatch, {}, {"guard-app-timeout": "soon"})
    assert "node config guard-app-timeout must be a number of seconds > 0, got 'soon'" in bad["reason"]


def _shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm", encoding="ascii") as table:
        next(table)
        return {int(line.split()[0]) for line in table if line.strip()}


@ROOT
def test_a_sandboxed_apps_sysv_shared_memory_is_its_own(tmp_path, guard_files, monkeypatch) -> None:
    """The sandbox has its own IPC namespace: a SysV segment the app makes is not in the
    host's table (nor left there). Positive control: the same app under ``process``
    leaves its segment in the host's table."""
    import ctypes

    secret, _, port = guard_files
    key = 0x46475321 + os.getpid() % 1000
    seen = _escape(tmp_path, secret, port, AppIsolation.resolve("sandbox"), monkeypatch, {"shm-key": key})
    assert seen["shmid"] >= 0 and key not in _shm_keys()
    seen = _escape(tmp_path / "b", secret, port, None, monkeypatch, {"shm-key": key})
    try:
        assert seen["shmid"] >= 0 and key in _shm_keys()
    finally:
        ctypes.CDLL(None).shmctl(seen["shmid"], 0, None)  # IPC_RMID
