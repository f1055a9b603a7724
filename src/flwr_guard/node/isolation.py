"""How far the app's process is kept from the guard: ``--app-isolation`` (no Flower imports).

The guard (:mod:`flwr_guard.node.runner`) holds the node's policy, its SecAgg+ keys, the
DP ledger and the SuperExec's authentication secret; the app's ClientApp runs in a child
process (:mod:`flwr_guard.node.app_process`). The operator chooses how that child is
started (``flwr-guard node start --app-isolation LEVEL [--app-user USER|UID[:GID]]``,
also on ``flwr-guard node superexec``):

``sandbox``
    the child runs as another user (``--app-user``; no supplementary groups,
    ``no_new_privs``, no capabilities) in new network, PID and mount namespaces
    (util-linux ``unshare --net --pid --mount --ipc --uts``, then :mod:`flwr_guard.node.sandbox_init`):
    no network interface but a loopback that is down, so it can connect to nothing (not
    the SuperNode's ClientAppIo port, the SuperLink, or the internet); it sees only its
    own processes, and every process it starts dies with it; its temporary directory
    and ``/dev/shm`` are fresh and hold only its own workspace; its SysV IPC objects and
    host name are its own (IPC and UTS namespaces). Needs root, or
    ``CAP_SETUID``, ``CAP_SETGID``, ``CAP_SYS_ADMIN`` plus ``CAP_CHOWN`` and
    ``CAP_DAC_OVERRIDE`` (the guard gives the app its workspace and reads back its ledger copy).
``user``
    the child runs as another user (same credential drop, util-linux ``setpriv``) with
    the host's network and process table: for containers without ``CAP_SYS_ADMIN``.
    Processes the app starts do not outlive its turn (:meth:`AppIsolation.app_turn`,
    :meth:`AppIsolation.kill_app_user`: apps of one uid take turns, and every process of
    the uid is killed after each app).
``process``
    the child runs as the guard's own user (the behaviour before this option): a
    boundary for a plain or careless app, not a hostile one (docs/threat-model.md).
``auto`` (default)
    ``sandbox`` when the guard has the capabilities, else ``process``.

Under ``sandbox`` and ``user`` the child gets (:class:`AppWorkspace`) a fresh per-message
workspace: its ``FLWR_HOME`` (= ``HOME``, where the FAB is installed) and the directory
of its ledger copy, owned by the app's user, mode 0700, under a guard-owned directory
(mode 0711) it cannot rename or list; and a minimal environment (:func:`app_environment`:
no ``FLWR_*`` secrets such as ``FLWR_MODEL_API_KEY``, no guard paths). Asking for
``sandbox`` or ``user`` where it cannot be had is an :class:`IsolationError` at start-up
naming the fix, never a silent fallback.

Default app user: uid/gid :data:`DEFAULT_APP_ID` (65530), an id no account uses: not
``nobody`` (65534), which NFS and other daemons share, so a ``nobody`` process could
read the app's workspace or signal it; below 65536, so it exists inside user-namespaced
containers (which map 65536 ids); outside Debian's account ranges (1000-59999, and
60000-64999 allocated by Debian) and systemd's dynamic users (61184-65519).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flwr_guard.errors import FlwrGuardError

logger = logging.getLogger("flwr_guard.node")

LEVELS = ("auto", "sandbox", "user", "process")
DEFAULT_APP_ID = 65530
SANDBOX_INIT = str(Path(__file__).with_name("sandbox_init.py"))
#: Capabilities by number (linux/capability.h) and what each level needs.
_CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SYS_ADMIN": 21}
NEEDED_CAPS = {"user": ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_SETGID", "CAP_SETUID"),
               "sandbox": ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_ADMIN")}
#: Environment variables the app's process keeps (under ``sandbox`` and ``user``), and
#: prefixes of kept ones; everything else of the guard's environment is dropped.
KEPT_ENV = frozenset({
    "PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONIOENCODING",
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "PYTHONUTF8",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    "FLWR_DISABLE_UPDATE_CHECK", "FLWR_LOG_LEVEL", "FLWR_TELEMETRY_ENABLED",
    # Where the app's telemetry goes (flwr_guard.telemetry.config; endpoints, no secrets;
    # under sandbox the app has no network and its pushes fail, logged by the app).
    "FLWR_GUARD_PUSHGATEWAY_URL", "FLWR_GUARD_METRICS_ADDRESS",
    # flwr_guard.deployment.processes' tag (a random id, no secret): lets a local
    # deployment find and stop what the app started.
    "FLWR_GUARD_SUPERVISOR",
})
KEPT_ENV_PREFIXES = ("LC_",)
_FIX = ("or choose --app-isolation process (the app then runs as the guard's user: "
        "docs/threat-model.md)")


class IsolationError(FlwrGuardError, RuntimeError):
    """The app isolation asked for cannot be had here (the message names the fix)."""


def effective_capabilities() -> set[str]:
    """The names in :data:`_CAPS` this process holds (``CapEff`` of ``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next(x for x in status if x.startswith("CapEff:"))
        bits = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return set()
    return {name for name, bit in _CAPS.items() if bits >> bit & 1}


def split_isolation_args(argv: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """``(--app-isolation, --app-user, the other arguments)`` of ``argv`` (defaults
    ``auto`` and ``None``); the others are ``flower-superexec``'s."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--app-isolation", default="auto")
    parser.add_argument("--app-user", default=None)
    known, rest = parser.parse_known_args(list(argv))
    return known.app_isolation, known.app_user, rest


def parse_app_user(spec: str | None) -> tuple[int, int]:
    """``USER``, ``USER:GROUP``, ``UID`` or ``UID:GID`` as ``(uid, gid)``; ``None``:
    :data:`DEFAULT_APP_ID`. A user name without a group takes its primary group.

    Raises:
        IsolationError: an unknown name, root (0), or the guard's own uid or gid.
    """
    if spec is None or spec == "":
        uid = gid = DEFAULT_APP_ID
    else:
        user, _, group = spec.partition(":")
        try:
            if user.isdigit():
                uid, gid = int(user), int(user)
            else:
                entry = pwd.getpwnam(user)
                uid, gid = entry.pw_uid, entry.pw_gid
            if group:
                if group.isdigit():
                    gid = int(group)
                else:
                    import grp

                    gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise IsolationError(f"--app-user {spec}: no such user or group on this host "
                                 "(give a numeric UID[:GID])") from None
    if uid == 0 or gid == 0:
        raise IsolationError(f"--app-user {spec}: the app must not run as root (uid or gid 0)")
    if uid == os.geteuid() or gid == os.getegid():
        raise IsolationError(f"--app-user {spec}: that is the guard's own user or group; "
                             "choose an id no other service uses")
    if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
        raise IsolationError(f"--app-user {spec}: not a valid id")
    return uid, gid


def needed_paths(extra: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """The directories the app's interpreter must reach: the interpreter's, the
    prefixes (venv and base), every existing ``sys.path`` directory, and ``extra``."""
    cwd = os.path.realpath(os.getcwd())  # the guard's ``-m`` entry: not the app's
    out: set[str] = {os.path.dirname(os.path.realpath(sys.executable)),
                     os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
                     os.path.realpath(sys.exec_prefix)}
    for entry in sys.path:
        if entry and os.path.isdir(entry) and os.path.realpath(entry) != cwd:
            out.add(os.path.realpath(entry))
    out.update(os.path.realpath(p) for p in extra)
    return sorted(out)


def unreachable(paths: Sequence[str], uid: int, gid: int) -> list[str]:
    """``"DIR (mode M, owner U)"`` for each directory on the way to ``paths`` that
    ``uid``/``gid`` cannot search (``sandbox`` exposes them; ``user`` cannot)."""
    from flwr_guard.node import sandbox_init

    out = []
    for directory, _ in sandbox_init.blocked(list(paths), uid, gid):
        st = os.stat(directory)
        text = f"{directory} (mode {st.st_mode & 0o7777:04o}, owner uid {st.st_uid})"
        if text not in out:
            out.append(text)
    return out


def app_environment(environ: dict[str, str], home: str) -> dict[str, str]:
    """The app's environment: the kept variables of ``environ`` (:data:`KEPT_ENV`),
    ``HOME`` = ``FLWR_HOME`` = ``home``, ``TMPDIR`` = ``home/tmp``."""
    env = {k: v for k, v in environ.items() if k in KEPT_ENV or k.startswith(KEPT_ENV_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update({"HOME": home, "FLWR_HOME": home, "TMPDIR": os.path.join(home, "tmp")})
    return env


@dataclass(frozen=True)
class AppWorkspace:
    """One message's workspace for the app (see the module docstring).

    Attributes:
        top: the guard's directory (mode 0711, or 0700 under ``process``).
        home: the app's ``FLWR_HOME``/``HOME`` (``None`` under ``process``: the guard's).
        ledger_dir: the (empty) directory for the app's ledger copy.
        owner: ``(uid, gid)`` of the app's user, ``None`` under ``process``.
    """

    top: Path
    home: Path | None
    ledger_dir: Path
    owner: tuple[int, int] | None


@dataclass(frozen=True)
class AppIsolation:
    """The isolation in force (a resolved level: ``sandbox``, ``user`` or ``process``).

    Use :meth:`resolve` (checks that it can be had); :meth:`command` and
    :meth:`environment` start the app's process under it.
    """

    level: str = "process"
    uid: int | None = None
    gid: int | None = None
    requested: str = "process"

    @classmethod
    def resolve(cls, requested: str = "auto", app_user: str | None = None) -> AppIsolation:
        """The isolation for ``requested`` (one of :data:`LEVELS`).

        Raises:
            IsolationError: an unknown level; ``sandbox``/``user`` asked for without the
                capabilities, the util-linux commands, or (``user``) with the Python
                installation out of the app user's reach; names the fix.
        """
        if requested not in LEVELS:
            raise IsolationError(f"--app-isolation {requested!r}: choose one of {', '.join(LEVELS)}")
        caps = effective_capabilities()
        level = requested
        if requested == "auto":
            level = "sandbox" if not set(NEEDED_CAPS["sandbox"]) - caps else "process"
        if level == "process":
            return cls("process", None, None, requested)
        missing = [c for c in NEEDED_CAPS[level] if c not in caps]
        if missing:
            raise IsolationError(
                f"--app-isolation {level} needs the guard to run as root or with "
                f"{', '.join(NEEDED_CAPS[level])} (missing: {', '.join(missing)}); in a container "
                f"run it as root with cap_drop ALL and cap_add {', '.join(c[4:] for c in NEEDED_CAPS[level])}"
                + ("; without CAP_SYS_ADMIN use --app-isolation user" if level == "sandbox" else "")
                + f", {_FIX}")
        tools = ["setpriv"] + (["unshare"] if level == "sandbox" else [])
        absent = [t for t in tools if shutil.which(t) is None]
        if absent:
            raise IsolationError(f"--app-isolation {level} needs util-linux's {' and '.join(absent)} "
                                 f"on PATH (Debian: apt-get install util-linux), {_FIX}")
        uid, gid = parse_app_user(app_user)
        if level == "user":
            blocked = unreachable(needed_paths([tempfile.gettempdir()]), uid, gid)
            if blocked:
                raise IsolationError(
                    f"--app-isolation user: the app's user {uid}:{gid} cannot reach the Python "
                    f"installation or its packages through {'; '.join(blocked)}: install Python "
                    "and the venv where every user can read them (e.g. /usr/local or /opt), "
                    f"or use --app-isolation sandbox (it exposes them in the app's own mount namespace), {_FIX}")
        return cls(level, uid, gid, requested)

    @property
    def isolated(self) -> bool:
        """Whether the app runs as another user (``sandbox`` or ``user``)."""
        return self.level in ("sandbox", "user")

    def describe(self) -> str:
        """The one line the guard logs at start: the isolation in force and what it means."""
        why = f" (--app-isolation {self.requested})"
        if self.level == "sandbox":
            return (f"flwr-guard node: app isolation sandbox{why}: each app runs as uid {self.uid} "
                    f"gid {self.gid} with no capabilities, no network (a new network namespace, "
                    "loopback down), its own PID and mount namespaces; it cannot read the guard's "
                    "0600 files (SuperExec secret, keys, ledger)")
        if self.level == "user":
            return (f"flwr-guard node: app isolation user{why}: each app runs as uid {self.uid} "
                    f"gid {self.gid} with no capabilities; it cannot read the guard's 0600 files, "
                    "but it has the host's network; every process of its uid is killed after it")
        more = ("; the guard lacks CAP_SETUID/CAP_SETGID/CAP_SYS_ADMIN (run it as root for sandbox)"
                if self.requested == "auto" else "")
        return (f"flwr-guard node: app isolation process{why}: each app runs as the guard's own "
                "user, with network: it can read what the guard can read (SuperExec secret, keys, "
                f"ledger); only the FAB allow-list keeps hostile code out{more}")

    def to_args(self) -> list[str]:
        """The runner's arguments for this isolation (resolved: no ``auto``)."""
        args = ["--app-isolation", self.level]
        if self.isolated:
            args += ["--app-user", f"{self.uid}:{self.gid}"]
        return args

    @contextmanager
    def workspace(self) -> Iterator[AppWorkspace]:
        """A fresh :class:`AppWorkspace`, removed afterwards."""
        top = Path(tempfile.mkdtemp(prefix="flwr-guard-app-"))
        try:
            ledger_dir = top / "ledger"
            ledger_dir.mkdir(mode=0o700)
            if not self.isolated:
                yield AppWorkspace(top, None, ledger_dir, None)
                return
            assert self.uid is not None and self.gid is not None
            owner = (self.uid, self.gid)
            home = top / "home"
            (home / "tmp").mkdir(mode=0o700, parents=True)
            # The ledger directory stays the guard's (0700) until the copy is in it:
            # LedgerHandout gives it to the app's user afterwards (hand_over).
            for path in (home / "tmp", home):
                os.chmod(path, 0o700)
                os.chown(path, *owner)
            os.chmod(top, 0o711)
            yield AppWorkspace(top, home, ledger_dir, owner)
        finally:
            shutil.rmtree(top, ignore_errors=True)

    @contextmanager
    def app_turn(self) -> Iterator[None]:
        """Hold the node-wide turn of the app's uid (``sandbox`` and ``user``): apps of one
        app uid run on the node one at a time, so that no app of that uid runs while
        another's process of the same uid is alive (it could ptrace it, or plant files in
        its workspace). An exclusive ``flock`` on ``<tmp>/flwr-guard-<euid>/app-uid-<uid>.lock``
        (a directory of the guard's, mode 0700). Concurrent runs' apps take turns; each
        turn is bounded by node config ``guard-app-timeout``. Nothing under ``process``."""
        if not self.isolated:
            yield
            return
        directory = os.path.join(tempfile.gettempdir(), f"flwr-guard-{os.geteuid()}")
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise IsolationError(f"{directory} is not a directory of the guard's user with mode "
                                 "0700 (someone else made it?): remove it, the guard re-creates it")
        fd = os.open(os.path.join(directory, f"app-uid-{self.uid}.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def kill_app_user(self) -> None:
        """Kill every process of the app's uid (``sandbox`` and ``user``; nothing under
        ``process``): a forked child takes the app's uid and gid (CAP_SETUID, CAP_SETGID:
        no CAP_KILL needed) and sends ``kill(-1, SIGKILL)`` (every process it may signal:
        those whose real or saved uid is the app's) until none is left; the guard waits
        for it. Called after each app, so nothing the app left behind outlives its turn."""
        if not self.isolated:
            return
        assert self.uid is not None and self.gid is not None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                # Until a sweep finds nothing: a fork bomb may add processes between two
                # sweeps; killed processes count until reaped (bounded: about 2 s).
                for _ in range(400):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        code = 0
                        break
                    time.sleep(0.005)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            logger.warning("flwr-guard node: processes of the app's uid %s may be left "
                           "(the kill sweep did not finish)", self.uid)

    def command(self, argv: Sequence[str], space: AppWorkspace) -> list[str]:
        """``argv`` wrapped to start under this isolation."""
        if self.level == "process":
            return list(argv)
        if self.level == "user":
            return ["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid), "--clear-groups",
                    "--no-new-privs", "--pdeathsig", "KILL", "--", *argv]
        import json

        expose = needed_paths([space.top])
        tmpdir = os.path.realpath(tempfile.gettempdir())
        top = os.path.realpath(space.top)
        # A private temporary directory; what the interpreter needs from the host's (a
        # venv or checkout under /tmp) is bound into it read-only.
        keep = [p for p in expose if (p + "/").startswith(tmpdir + "/") and p != tmpdir
                and p != top and not p.startswith(top + "/")]
        private = os.path.dirname(top) == tmpdir and tmpdir not in expose
        spec = {"uid": self.uid, "gid": self.gid, "argv": list(argv), "cwd": str(space.home),
                "expose": expose, "stage": str(space.top / "stage"),
                "private_tmp": tmpdir if private else "", "workspace": top, "tmp_keep": keep}
        return ["setpriv", "--pdeathsig", "KILL", "--",
                "unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
                "--mount-proc", "--",
                sys.executable, "-I", "-S", "-B", SANDBOX_INIT, json.dumps(spec)]

    def environment(self, space: AppWorkspace) -> dict[str, str] | None:
        """The app's environment (``None`` under ``process``: the guard's, as before)."""
        if not self.isolated:
            return None
        return app_environment(dict(os.environ), str(space.home))

    def check(self, timeout: float = 120.0) -> None:
        """Start Python under this isolation once and import what the app's process needs
        (Flower and :mod:`flwr_guard.node.app_child`): a start-up check.

        Raises:
            IsolationError: it failed; the message carries its error output and the fix.
        """
        if not self.isolated:
            return
        probe = [sys.executable, "-c", "import flwr.app, flwr.clientapp, flwr_guard.node.app_child"]
        with self.workspace() as space:
            try:
                done = subprocess.run(self.command(probe, space), env=self.environment(space),
                                      cwd=space.home, capture_output=True, text=True,
                                      timeout=timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise IsolationError(f"--app-isolation {self.level}: cannot start the app's "
                                     f"process: {err}; {_FIX}") from err
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise IsolationError(
                f"--app-isolation {self.level}: a test start of the app's process as uid "
                f"{self.uid} failed (exit {done.returncode}: {' | '.join(tail)}); check that "
                f"this user can read the Python installation and site-packages, {_FIX}")
