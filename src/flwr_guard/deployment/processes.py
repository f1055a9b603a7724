"""Start processes, follow everything they spawn, and stop all of it by PID.

Flower's components start each other detached (the SuperLink and SuperNodes start a
``flower-superexec`` in a new session, which starts ``flwr-serverapp`` and
``flwr-clientapp`` processes), so killing a process group is not enough. The
supervisor tags the environment of what it starts (children inherit it, also once
reparented to init), records every such process it sees (PID and start time, so a
reused PID is never mistaken for ours) and stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

TAG_ENV = "FLWR_GUARD_SUPERVISOR"


@dataclass
class ManagedProcess:
    """A process the supervisor started."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    # Size of the log (shared with earlier processes of the same name) when this one
    # started: what it wrote begins there.
    log_offset: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        """``None`` while running, else the exit code (negative: killed by a signal)."""
        return self.popen.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def own_log(self) -> str:
        """What this process wrote to its log (not an earlier process of the same name);
        empty when the log cannot be read."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.log_offset)
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""


@dataclass(frozen=True)
class ProcessRecord:
    """Identity of a process that was seen: PID plus start time (PIDs get reused)."""

    pid: int
    create_time: float
    name: str

    def is_alive(self) -> bool:
        """True if this very process still runs (zombies count as gone)."""
        try:
            proc = psutil.Process(self.pid)
            return (
                abs(proc.create_time() - self.create_time) < 1e-3
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False


@dataclass
class ProcessSupervisor:
    """Owns a set of processes and all of their descendants."""

    log_dir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: list[ManagedProcess] = field(default_factory=list)
    seen: dict[tuple[int, float], ProcessRecord] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> ManagedProcess:
        """Start ``argv`` with stdout and stderr in ``log_dir/<name>.log``.

        Raises:
            FileNotFoundError: if the executable is not on ``PATH``.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, TAG_ENV: self.tag},
                start_new_session=True,  # a Ctrl-C in the terminal reaches only us
            )
        managed = ManagedProcess(name, list(argv), popen, log_path, offset)
        self.processes.append(managed)
        self.refresh()
        logger.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return managed

    def refresh(self) -> list[ProcessRecord]:
        """Record every process alive now that carries our tag; return all ever seen."""
        for proc in psutil.process_iter(["pid", "name", "create_time"]):
            try:
                if proc.environ().get(TAG_ENV) != self.tag:
                    continue
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            key = (proc.info["pid"], proc.info["create_time"])
            if key not in self.seen:
                self.seen[key] = ProcessRecord(key[0], key[1], proc.info["name"])
        return list(self.seen.values())

    def dead(self) -> list[ManagedProcess]:
        """Started processes that have exited."""
        return [p for p in self.processes if p.exit_code() is not None]

    def stop_all(self, timeout: float = 10.0) -> list[ProcessRecord]:
        """Stop every started process and every descendant seen; return survivors.

        SIGTERM first (Flower's components shut down their children on it), then
        SIGKILL for whatever is still there after ``timeout`` seconds.
        """
        self.refresh()
        procs = []
        for record in self.seen.values():
            if record.is_alive():
                try:
                    procs.append(psutil.Process(record.pid))
                except psutil.NoSuchProcess:
                    pass
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for managed in self.processes:  # reap our direct children
            try:
                managed.popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        # Descendants may have spawned more children while we were stopping them.
        survivors = [r for r in self.refresh() if r.is_alive()]
        for record in survivors:
            try:
                os.kill(record.pid, signal.SIGKILL)
            except OSError:
                pass
        psutil.wait_procs([p for p in map(_process, survivors) if p], timeout=5)
        return [r for r in survivors if r.is_alive()]


def _process(record: ProcessRecord) -> psutil.Process | None:
    try:
        return psutil.Process(record.pid)
    except psutil.NoSuchProcess:
        return None


def deployment_pss_bytes() -> int:
    """Summed PSS (proportional set size: shared pages split between the processes that
    share them; RSS where the platform has no PSS) of every process this library started
    (tagged with ``TAG_ENV``), in bytes. Processes that vanish or deny access are skipped."""
    total = 0
    for proc in psutil.process_iter():
        try:
            if TAG_ENV not in proc.environ():
                continue
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return total
