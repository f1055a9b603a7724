"""The node's record-level ledger reserved while an app holds a copy: two runs' apps on
one node at once can never spend past the node's cap together (issue 19, the reviewer's
overspend: epsilon 4.28 against a cap of 3.0 before the reservation)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from flwr_guard.dp.dpsgd import opacus_epsilon
from flwr_guard.dp.record_ledger import (
    LedgerReserved,
    RecordLedger,
    Reservation,
    init_ledger,
    ledger_path,
)
from flwr_guard.node.app_config import LedgerHandout

CAP, DELTA = 3.0, 1e-5
ROUND = (0.8, 0.02, 40)  # one round: epsilon 2.75 from 0; two rounds: 3.12 > CAP


def _app_round(handout: LedgerHandout) -> bool:
    """What the app's DP-SGD does on its copy (``DPSGD.make_private``): check the budget
    against the copy's history, then reserve the round's steps in the copy."""
    copy = RecordLedger(handout.node_config["dp-sgd-ledger"], "s")
    if opacus_epsilon([*copy.history, ROUND], DELTA) > CAP:
        return False  # PrivacyBudgetExceeded: nothing reserved
    copy.reserve(*ROUND)
    return True


def test_one_round_fits_the_cap_and_two_do_not() -> None:
    # The premise of the overspend: each app alone passes its check, both together pass the cap.
    assert opacus_epsilon([ROUND], DELTA) < CAP < opacus_epsilon([ROUND, ROUND], DELTA)


def test_two_runs_at_once_never_spend_past_the_nodes_cap(tmp_path, caplog) -> None:
    init_ledger(tmp_path, "s")
    node = {"dp-sgd-ledger": str(tmp_path), "dp-sgd-data-source": "s"}
    caplog.set_level(logging.INFO, logger="flwr_guard.node")
    first = LedgerHandout(node, holder={"run-id": 1})
    second: dict[str, LedgerHandout] = {}
    thread = threading.Thread(target=lambda: second.update(h=LedgerHandout(node, holder={"run-id": 2})))
    thread.start()
    # The second run's handout is asked for while the first app holds its copy: it is
    # either handed out at once (no reservation) or waits (reserved); go on on either.
    for _ in range(3000):
        if "h" in second or "is reserved by another app" in caplog.text:
            break
        time.sleep(0.01)
    assert _app_round(first)
    assert first.take_back(5) is None
    thread.join(timeout=60)
    assert "h" in second
    ran = _app_round(second["h"])
    assert second["h"].take_back(5) is None
    spent = opacus_epsilon(RecordLedger(tmp_path, "s").history, DELTA)
    # Without the reservation both apps pass their check and the node spends 3.12 > 3.0.
    assert spent <= CAP, f"the node spent epsilon {spent:.3f} past its cap {CAP}"
    assert not ran  # the second app saw the first one's steps and was refused
    assert RecordLedger(tmp_path, "s").history == [ROUND]


def test_a_second_handout_waits_then_gives_up_naming_the_holder(tmp_path) -> None:
    init_ledger(tmp_path, "s")
    node = {"dp-sgd-ledger": str(tmp_path), "dp-sgd-data-source": "s"}
    first = LedgerHandout(node, holder={"run-id": 11})
    with pytest.raises(LedgerReserved, match=r"stayed reserved for 0.3 s by .*'run-id': 11"):
        LedgerHandout(node, holder={"run-id": 12}, wait_s=0.3)
    assert first.take_back() is None
    # Released: the next handout is made at once.
    assert LedgerHandout(node, wait_s=0).take_back() is None


def test_the_steps_of_a_guard_that_died_with_a_copy_out_are_settled_not_lost(tmp_path) -> None:
    init_ledger(tmp_path, "s")
    node = {"dp-sgd-ledger": str(tmp_path), "dp-sgd-data-source": "s"}
    copy_dir = tmp_path / "dead-copy"
    copy_dir.mkdir()
    # A guard in another process takes the reservation, hands out a copy, its app reserves
    # steps in it, and the guard is killed before it takes the copy back.
    script = (
        "import os, sys\n"
        "from flwr_guard.node.app_config import LedgerHandout\n"
        "from flwr_guard.dp.record_ledger import RecordLedger\n"
        f"h = LedgerHandout({node!r}, copy_dir={str(copy_dir)!r}, holder={{'run-id': 3}})\n"
        f"RecordLedger({str(copy_dir)!r}, 's').reserve(1.0, 0.01, 7)\n"
        "os._exit(9)\n"
    )
    import subprocess
    import sys

    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    leftover = json.loads((tmp_path / "s.reservation").read_text())
    assert leftover["run-id"] == 3 and leftover["copy"] == str(ledger_path(copy_dir, "s"))
    assert RecordLedger(tmp_path, "s").history == []  # the dead guard never took it back
    handout = LedgerHandout(node)
    assert RecordLedger(tmp_path, "s").history == [(1.0, 0.01, 7)]  # settled by the next holder
    assert RecordLedger(handout.node_config["dp-sgd-ledger"], "s").history == [(1.0, 0.01, 7)]
    assert handout.take_back() is None
    assert (tmp_path / "s.reservation").read_text() == ""  # released: no leftover


def test_a_ledger_copy_the_app_replaced_by_a_fifo_or_a_link_is_refused_not_read(tmp_path) -> None:
    init_ledger(tmp_path / "node", "s")
    (tmp_path / "secret").write_text(json.dumps({"history": [[1.0, 0.01, 1]]}))
    node = {"dp-sgd-ledger": str(tmp_path / "node"), "dp-sgd-data-source": "s"}
    for make in (lambda p: os.mkfifo(p), lambda p: os.symlink(tmp_path / "secret", p)):
        handout = LedgerHandout(node)
        copy = ledger_path(handout.copy_dir, "s")
        copy.unlink()
        make(copy)
        reason = handout.take_back()  # returns (a FIFO would block a plain read forever)
        assert reason is not None and "deleted or unreadable" in reason
    assert RecordLedger(tmp_path / "node", "s").history == []


def test_a_reservation_is_exclusive_across_processes_and_freed_by_the_kernel_on_death(tmp_path) -> None:
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from flwr_guard.dp.record_ledger import Reservation\n"
        f"r = Reservation({str(tmp_path)!r}, 's'); r.record({{'pid': 1}})\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LedgerReserved):
            Reservation(tmp_path, "s", wait_s=0.2)
    finally:
        holder.kill()
        holder.wait()
    again = Reservation(tmp_path, "s", wait_s=5)
    assert again.leftover == {"pid": 1}  # what the dead holder left
    again.release()


def test_a_dead_guards_workspace_is_removed_when_its_copy_is_settled(tmp_path) -> None:
    import subprocess
    import sys
    import tempfile

    init_ledger(tmp_path, "s")
    node = {"dp-sgd-ledger": str(tmp_path), "dp-sgd-data-source": "s"}
    top = tempfile.mkdtemp(prefix="flwr-guard-app-")
    script = (
        "import os, pathlib\n"
        "from flwr_guard.node.app_config import LedgerHandout\n"
        f"d = pathlib.Path({top!r}) / 'ledger'; d.mkdir()\n"
        f"h = LedgerHandout({node!r}, copy_dir=d)\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert os.path.isdir(top)
    LedgerHandout(node).take_back()
    assert not os.path.exists(top)


def test_a_guard_stopped_with_sigterm_mid_app_records_the_steps_and_removes_the_workspace(tmp_path) -> None:
    import signal
    import subprocess
    import sys

    from conftest import FIXTURES

    init_ledger(tmp_path / "ledger", "s")
    script = f"""
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr_guard.node.allowlist import fab_hash
from flwr_guard.node.app_process import run_app
from flwr_guard.node.runner import exit_on_sigterm

exit_on_sigterm()
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
import pathlib
content = build_fab_from_disk(pathlib.Path({str(FIXTURES / "node_guard" / "probe")!r}))
fab = Fab(fab_hash(content), content, {{}})
run = Run.create_empty(run_id=7)
run.fab_id, run.fab_version, run.fab_hash = "flwr-guard-tests/probe", "1.0.0", fab.hash_str
context = Context(run_id=7, node_id=5, node_config={{"dp-sgd-ledger": {str(tmp_path / "ledger")!r},
                  "dp-sgd-data-source": "s"}}, state=RecordDict(), run_config={{"mode": "ledger-reserve-sleep"}})
msg = Message(content=RecordDict({{"arrays": ArrayRecord([np.ones(3, dtype=np.float32)]),
              "config": ConfigRecord({{}})}}), dst_node_id=5, message_type="train", group_id="1")
msg.metadata.__dict__["_message_id"] = msg.object_id
run_app(msg, context, run, fab)
"""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    guard = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert guard.stdout is not None
        for line in guard.stdout:  # the app's own output: its copy holds the steps
            if line.startswith("reserved "):
                break
        assert line.startswith("reserved "), line
        _, copy_dir, app_pid = line.split()
        workspace = Path(copy_dir).parent
        assert workspace.name.startswith("flwr-guard-app-") and workspace.is_dir()
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=60) == 143
    finally:
        guard.kill()
        guard.wait()
    assert RecordLedger(tmp_path / "ledger", "s").history == [(1.5, 0.02, 10)]  # taken back
    import psutil

    try:  # the app's process went with its guard (killed, then reaped)
        gone = psutil.Process(int(app_pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        gone = True
    assert gone, f"the app's process {app_pid} outlived its guard"
    assert not workspace.exists()
    assert (tmp_path / "ledger" / "s.reservation").read_text() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop to the container's capabilities)")
def test_a_guard_with_only_the_containers_capabilities_hands_the_app_its_copy(tmp_path) -> None:
    """The compose files and the Helm chart run the guard as root with SETUID, SETGID,
    CHOWN and DAC_OVERRIDE only (--app-isolation user). The copy is handed to the app's
    uid, the app's steps in it reach the node's ledger, and the copy is taken back. (A
    copy chowned before its chmod needed CAP_FOWNER: EPERM, every round refused.)"""
    import subprocess
    import sys

    init_ledger(tmp_path, "s")
    node = {"dp-sgd-ledger": str(tmp_path), "dp-sgd-data-source": "s"}
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir(mode=0o700)  # the guard's until the copy is in it (then the app's)
    script = (
        "import os\n"
        "from flwr_guard.node.app_config import LedgerHandout\n"
        "from flwr_guard.dp.record_ledger import RecordLedger, ledger_path\n"
        f"h = LedgerHandout({node!r}, copy_dir={str(copy_dir)!r}, owner=(65530, 65530))\n"
        f"copy = ledger_path({str(copy_dir)!r}, 's')\n"
        "st = os.stat(copy)\n"
        "assert (st.st_uid, st.st_mode & 0o777) == (65530, 0o600), (st.st_uid, oct(st.st_mode))\n"
        f"RecordLedger({str(copy_dir)!r}, 's').reserve(1.0, 0.01, 7)\n"
        "assert h.take_back() is None\n"
    )
    caps = "-all,+setuid,+setgid,+chown,+dac_override"
    done = subprocess.run(["setpriv", "--bounding-set", caps, "--inh-caps", "-all", "--",
                           sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert RecordLedger(tmp_path, "s").history == [(1.0, 0.01, 7)]
