"""The node guard against what an app's user leaves behind or plants (the sandbox
review: a leftover process of the app's uid, a concurrent app of the same uid, a copy
of the ledger holding values no accountant can take)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flwr_guard.dp.record_ledger import RecordLedger, init_ledger
from flwr_guard.node.app_config import LedgerHandout
from flwr_guard.node.isolation import AppIsolation

APP = 65530
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another uid needs root")


@ROOT
def test_the_ledger_directory_stays_the_guards_until_the_copy_is_written(tmp_path) -> None:
    """F1: the workspace's ledger directory was the app uid's before the guard wrote the
    copy into it as root by path, so a leftover process planted ``s.json -> VICTIM`` and
    root rewrote and chowned VICTIM. Now the directory is the guard's (0700) until the
    copy is in it, and the copy is created with O_EXCL|O_NOFOLLOW."""
    init_ledger(tmp_path / "node", "s")
    node = {"dp-sgd-ledger": str(tmp_path / "node"), "dp-sgd-data-source": "s"}
    with AppIsolation("user", APP, APP, "user").workspace() as space:
        st = os.lstat(space.ledger_dir)
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
        handout = LedgerHandout(node, copy_dir=space.ledger_dir, owner=space.owner)
        st = os.lstat(space.ledger_dir)
        assert (st.st_uid, st.st_mode & 0o777) == (APP, 0o700)  # given over after the copy
        copy = space.ledger_dir / "s.json"
        assert (os.lstat(copy).st_uid, os.lstat(copy).st_mode & 0o777) == (APP, 0o600)
        assert handout.take_back() is None


@ROOT
def test_a_link_planted_where_the_copy_goes_is_never_written_through(tmp_path) -> None:
    """Defence in depth (a copy directory someone else could write): the planted link
    makes the handout fail; the file it points to keeps its owner, mode and content."""
    init_ledger(tmp_path / "node", "s")
    node = {"dp-sgd-ledger": str(tmp_path / "node"), "dp-sgd-data-source": "s"}
    victim = tmp_path / "victim.py"
    victim.write_text("print(1)\n")
    victim.chmod(0o644)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir(mode=0o700)
    os.chown(copy_dir, APP, APP)
    (copy_dir / "s.json").symlink_to(victim)
    with pytest.raises(FileExistsError):
        LedgerHandout(node, copy_dir=copy_dir, owner=(APP, APP))
    st = os.stat(victim)
    assert (st.st_uid, st.st_mode & 0o777, victim.read_text()) == (os.geteuid(), 0o644, "print(1)\n")
    # the reservation was released: the next handout does not wait
    (copy_dir / "s.json").unlink()
    LedgerHandout(node, copy_dir=copy_dir, owner=(APP, APP), wait_s=0).take_back()
    assert RecordLedger(tmp_path / "node", "s").history == []


def test_the_ledger_lock_is_the_guards_alone_and_a_held_lock_is_a_bounded_wait(tmp_path) -> None:
    """F2: ``<source>.lock`` was made 0644 in a 0755 directory: any uid could open and
    flock it and every app of the node then hung in its take-back (reservation held).
    Now the directory `ledger init` makes is 0700, the lock file 0600, and a lock held by
    someone else is a clear error after a bounded wait, never a hang."""
    import fcntl

    from flwr_guard.dp.record_ledger import LedgerReserved
    from flwr_guard.node.app_config import _locked

    init_ledger(tmp_path / "node", "s")
    assert os.stat(tmp_path / "node").st_mode & 0o777 == 0o700
    lock = tmp_path / "node" / "s.lock"
    lock.write_bytes(b"")
    lock.chmod(0o644)  # as the old guard left it
    with _locked(tmp_path / "node", "s"):
        pass
    assert lock.stat().st_mode & 0o777 == 0o600
    with open(lock, "rb") as other:  # another open file description holds it
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(LedgerReserved, match=r"s\.lock of the node's record-level ledger "
                                                 r"stayed held for 0\.2 s by another process"):
            with _locked(tmp_path / "node", "s", wait_s=0.2):
                pass


BAD_STEPS = [  # the probe's value and its kin
    [float("inf"), 0.5, 1], [1e300, 0.5, 1], [float("nan"), 0.5, 1], [-1.0, 0.5, 1],
    [1.0, 0.0, 1], [1.0, 1.5, 1], [1.0, float("nan"), 1], [1.0, 0.5, 10**12], [1.0, 0.5, -3],
    [1.0, 0.5, 2.5],
]


@pytest.mark.parametrize("bad", BAD_STEPS, ids=repr)
def test_a_copy_extended_with_steps_no_accountant_can_take_is_refused_and_the_ledger_kept(
        tmp_path, bad) -> None:
    """F3: one app step at noise multiplier inf passed ``extends`` and the ledger's check,
    reached the node's ledger as JSON ``Infinity``, and every later budget check hung in
    Opacus (or raised OverflowError). Now the reply is refused naming the reason and the
    node's ledger keeps what it held."""
    import json

    init_ledger(tmp_path / "node", "s")
    RecordLedger(tmp_path / "node", "s").reserve(1.0, 0.01, 5)
    node = {"dp-sgd-ledger": str(tmp_path / "node"), "dp-sgd-data-source": "s"}
    handout = LedgerHandout(node)
    copy = Path(handout.node_config["dp-sgd-ledger"]) / "s.json"
    data = json.loads(copy.read_text())
    data["history"].append(bad)
    copy.write_text(json.dumps(data))
    reason = handout.take_back()
    assert reason is not None and "holds values the ledger refuses: invalid ledger entry" in reason
    assert RecordLedger(tmp_path / "node", "s").history == [(1.0, 0.01, 5)]


@pytest.mark.parametrize("bad", BAD_STEPS, ids=repr)
def test_a_ledger_file_holding_such_steps_is_refused_and_opacus_epsilon_checks_its_input(
        tmp_path, bad) -> None:
    import json

    from flwr_guard.dp.dpsgd import opacus_epsilon
    from flwr_guard.dp.record_ledger import LedgerCorrupt, append_steps

    path = init_ledger(tmp_path, "s")
    data = json.loads(path.read_text())
    data["history"] = [[1.0, 0.01, 5], bad]
    path.write_text(json.dumps(data))
    with pytest.raises(LedgerCorrupt, match="invalid ledger entry"):
        RecordLedger(tmp_path, "s")
    with pytest.raises(ValueError, match="invalid ledger entry"):
        append_steps([], tuple(bad))
    if bad[1] != 0.0:  # a step never sampled costs nothing: opacus_epsilon skips it
        with pytest.raises(ValueError, match="invalid ledger entry"):
            opacus_epsilon([(1.0, 0.01, 5), tuple(bad)], 1e-5)
    assert opacus_epsilon([(1.0, 0.01, 5)], 1e-5) == pytest.approx(
        opacus_epsilon([(1.0, 0.01, 5), (0.5, 0.0, 3)], 1e-5))
    assert opacus_epsilon([(0.0, 0.01, 5)], 1e-5) == float("inf")  # no noise: infinite
