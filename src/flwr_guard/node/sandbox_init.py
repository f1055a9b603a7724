"""The first process inside the app's sandbox (``--app-isolation sandbox``); standard library only.

Run by :mod:`flwr_guard.node.isolation` as ``python -I -S -B sandbox_init.py SPEC`` under
``unshare --net --mount --pid --fork --kill-child --mount-proc`` (util-linux), so it
starts as root, as process 1 of a new PID namespace, in a new network namespace (only
a loopback interface, down) and a private mount namespace with its own ``/proc``. It
imports nothing but the standard library (``-S``: not even site-packages), then:

1. makes the paths the app's interpreter needs (``SPEC["expose"]``: the interpreter,
   the venv, ``sys.path``, the app's workspace) reachable by the app's user where an
   ancestor directory is not (e.g. a Python under ``/root``, mode 0700): each such
   ancestor is covered, in this mount namespace only, by an empty ``tmpfs`` (mode
   0711) holding read-only bind mounts of just the needed children; the rest of that
   directory (the guard's own files) is not visible at all;
2. gives the app a private temporary directory: a fresh ``tmpfs`` over the host's
   (``SPEC["private_tmp"]``) that holds only the app's own workspace (and, read-only,
   what the interpreter needs from the host's, ``SPEC["tmp_keep"]``), and a fresh
   ``/dev/shm``, so two apps (of one uid) never see each other's workspace or files;
3. drops to the app's user: no supplementary groups, ``setresgid``/``setresuid`` (every
   capability is lost), ``PR_SET_NO_NEW_PRIVS`` (no set-uid binary or file capability
   gives them back), ``PR_SET_PDEATHSIG`` SIGKILL (the credential change cleared the one
   ``unshare --kill-child`` set);
4. ``execve``'s the app's command (``SPEC["argv"]``) with its environment unchanged (the
   guard already gave this process the app's minimal environment).

When this process (then the app) exits, the kernel kills every other process of the
PID namespace: nothing the app starts outlives it (Linux ``pid_namespaces(7)``).
Errors go to stderr with exit status 125.
"""

import ctypes
import json
import os
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(value: "str | None") -> "bytes | None":
    return value.encode() if isinstance(value, str) else value


def _mount(source: "str | None", target: str, fstype: "str | None", flags: int,
           data: "str | None" = None) -> None:
    enc = _enc
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def traversable(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (no supplementary groups) may search directory ``path``."""
    st = os.stat(path)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def blocked(paths: "list[str]", uid: int, gid: int) -> "list[tuple[str, str]]":
    """``[(directory, child), ...]``: each ancestor directory of ``paths`` the user
    cannot search, with the child on the way (shallowest first)."""
    out: list[tuple[str, str]] = []
    for path in paths:
        parts = [p for p in path.split("/") if p]
        current = "/"
        for part in parts:
            child = os.path.join(current, part)
            if not traversable(current, uid, gid) and (current, child) not in out:
                out.append((current, child))
            current = child
    return sorted(out, key=lambda pair: pair[0].count("/") if pair[0] != "/" else 0)


def expose(paths: "list[str]", uid: int, gid: int, stage: str) -> None:
    """Step 1 of the module docstring (in this mount namespace only)."""
    pairs = blocked(paths, uid, gid)
    if not pairs:
        return
    os.makedirs(stage, mode=0o700, exist_ok=True)
    staged: dict[str, str] = {}
    for i, (_, child) in enumerate(pairs):  # bind every original before anything is covered
        if child in staged:
            continue
        point = os.path.join(stage, str(i))
        if os.path.isdir(child):
            os.mkdir(point, 0o700)
        else:
            open(point, "a").close()
        _mount(child, point, None, MS_BIND | MS_REC)
        staged[child] = point
    covered = set()
    for directory, child in pairs:
        if directory not in covered:
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0711")
            covered.add(directory)
        target = child
        if os.path.isdir(staged[child]):
            os.makedirs(target, mode=0o755, exist_ok=True)
        elif not os.path.exists(target):
            open(target, "a").close()
        _mount(staged[child], target, None, MS_BIND | MS_REC)
        if child not in {d for d, _ in pairs}:  # a directory exposed only: read-only
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for point in staged.values():
        _check(_libc.umount2(point.encode(), MNT_DETACH), f"umount {point}")


def private_tmp(tmpdir: str, workspace: str, keep: "list[str] | tuple[str, ...]" = ()) -> None:
    """Step 2 of the module docstring: a fresh ``tmpfs`` on ``tmpdir`` (mode 1777)
    holding only ``workspace`` (bound back at its path) and, read-only at their paths,
    the host's paths under ``tmpdir`` in ``keep`` (what the interpreter needs: a venv
    or checkout under ``/tmp``); and a fresh ``/dev/shm``."""
    outer = sorted({p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)})
    fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY)
    kept: dict[str, int] = {}
    try:
        for path in outer:
            kept[path] = os.open(path, os.O_PATH)
        _mount("tmpfs", tmpdir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        target = os.path.join(tmpdir, os.path.basename(workspace))
        os.mkdir(target, 0o711)
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        for path, kept_fd in kept.items():
            source = f"/proc/self/fd/{kept_fd}"
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            if os.path.isdir(source):
                os.makedirs(path, mode=0o755, exist_ok=True)
            else:
                open(path, "a").close()
            _mount(source, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    finally:
        os.close(fd)
        for kept_fd in kept.values():
            os.close(kept_fd)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def drop_privileges(uid: int, gid: int) -> None:
    """Step 3 of the module docstring."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def main() -> int:
    try:
        spec = json.loads(sys.argv[1])
        uid, gid = int(spec["uid"]), int(spec["gid"])
        expose(spec["expose"], uid, gid, spec["stage"])
        if spec.get("private_tmp"):
            private_tmp(spec["private_tmp"], spec["workspace"], spec.get("tmp_keep", []))
        drop_privileges(uid, gid)
        os.chdir(spec["cwd"])
        argv = spec["argv"]
        os.execve(argv[0], argv, dict(os.environ))
    except Exception as err:  # reported to the guard's log; the guard sees no answer
        sys.stderr.write(f"flwr-guard app sandbox: {type(err).__name__}: {err}\n")
        return 125
    return 125  # not reached


if __name__ == "__main__":
    sys.exit(main())
