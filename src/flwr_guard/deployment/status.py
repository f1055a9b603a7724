"""Follow a run's status on the SuperLink until its real end, with bounded retries.

``flwr run --stream`` exits 0 even when the ServerApp fails, so the launcher asks the
SuperLink (``flwr ls --run-id ID --format json``) until the run's status starts with
``finished:``. On a loaded machine one ``flwr ls`` can take more than a minute (three
timeouts of 60 s in a row were seen with 20 SuperNodes starting on 2 cores): a failed
read is no verdict on the run. :class:`StatusTracker` asks again with exponential
backoff and a per-attempt timeout that grows with each failure, and gives up only at a
deadline tied to the run's own timeout, with a message naming the attempts, the last
error and the last status it did read.

No Flower imports and no processes: the reader is injected (``LocalDeployment.run_info``
in the launcher, a fake in the unit tests), and so are the clock and the sleep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FINISHED_PREFIX = "finished:"
UNKNOWN = "unknown"


class StatusReadError(RuntimeError):
    """One attempt to read the run's status failed (a timeout, an unreadable answer)."""


class StatusUnknown(RuntimeError):
    """The run's status could not be read before the deadline (the message says why)."""


@dataclass(frozen=True)
class StatusPolicy:
    """When to ask for a run's status, and how long to keep asking after failures.

    Attributes:
        interval_s: seconds between reads while the run goes on (``flwr ls`` costs
            about 2 s of CPU: ask rarely).
        finishing_interval_s: seconds between reads once the ServerApp reported that it
            finished (the status follows within seconds).
        attempt_timeout_s: timeout of the first attempt, in seconds.
        attempt_timeout_step_s: added to the timeout of each further consecutive
            attempt (a slow ``flwr ls`` gets longer each time), up to
            ``max_attempt_timeout_s``.
        max_attempt_timeout_s: the longest a single attempt may take.
        backoff_s: wait before the first retry; doubled after each further failure, up
            to ``max_backoff_s``.
        max_backoff_s: the longest wait between two attempts.

    Raises:
        ValueError: from the constructor, for a value that is not > 0 (the steps may be 0).
    """

    interval_s: float = 10.0
    finishing_interval_s: float = 1.0
    attempt_timeout_s: float = 60.0
    attempt_timeout_step_s: float = 60.0
    max_attempt_timeout_s: float = 300.0
    backoff_s: float = 2.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("interval_s", "finishing_interval_s", "attempt_timeout_s",
                     "max_attempt_timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"StatusPolicy.{name} must be > 0, got {getattr(self, name)}")
        if self.attempt_timeout_step_s < 0:
            raise ValueError(
                f"StatusPolicy.attempt_timeout_step_s must be >= 0, got {self.attempt_timeout_step_s}"
            )

    def attempt_timeout(self, failures: int, base: float | None = None) -> float:
        """Timeout (s) of the attempt after ``failures`` consecutive failed ones, starting
        from ``base`` (default ``attempt_timeout_s``; the tracker passes the timeout of
        its last successful attempt, so a SuperLink that is slow stays given the time
        it needed)."""
        start = self.attempt_timeout_s if base is None else max(base, self.attempt_timeout_s)
        return min(self.max_attempt_timeout_s, start + failures * self.attempt_timeout_step_s)

    def backoff(self, failures: int) -> float:
        """Wait (s) before the next attempt after ``failures`` (>= 1) consecutive failures."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1))


@dataclass
class StatusTracker:
    """The run's status as last read, and when to read it next.

    Call :meth:`poll` as often as convenient: it reads only when due, returns the run
    record on a successful read, ``None`` otherwise, and raises :class:`StatusUnknown`
    once ``deadline`` (on ``clock``'s scale) has passed without the run being seen to
    finish. An attempt's timeout grows with each consecutive failure and starts, after a
    success, from the timeout that succeeded (:meth:`StatusPolicy.attempt_timeout`).
    :meth:`finishing` (the ServerApp reported its end) asks often from then on;
    :meth:`extend_deadline` lets the caller allow time after stopping a run.

    Args:
        read: ``read(timeout_s)`` returns the run record (``{"status": ...}``) or raises
            :class:`StatusReadError`.
        deadline: when to give up reading, on ``clock``'s scale.
        policy: intervals, timeouts and backoff.
        what: names the run in messages (e.g. ``"run 42"``).
    """

    read: Callable[[float], dict[str, Any]]
    deadline: float
    policy: StatusPolicy = field(default_factory=StatusPolicy)
    what: str = "the run"
    clock: Callable[[], float] = time.monotonic
    status: str = "n/a"
    record: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    failures: int = 0  # consecutive
    total_failures: int = 0
    last_error: str | None = None
    last_read_at: float | None = None
    next_read_at: float = 0.0
    _interval: float = 0.0
    _base_timeout: float | None = None  # the timeout of the last successful attempt

    def __post_init__(self) -> None:
        self._interval = self.policy.interval_s

    @property
    def finished(self) -> bool:
        return self.status.startswith(FINISHED_PREFIX)

    def finishing(self) -> None:
        """The run reported its end by another channel: read now, then often."""
        self._interval = self.policy.finishing_interval_s
        if self.failures == 0:
            self.next_read_at = min(self.next_read_at, self.clock())

    def read_now(self) -> None:
        """Make the next :meth:`poll` read (unless it is backing off after a failure)."""
        if self.failures == 0:
            self.next_read_at = self.clock()

    def extend_deadline(self, until: float) -> None:
        """Give up no earlier than ``until`` (e.g. after asking the SuperLink to stop the run)."""
        self.deadline = max(self.deadline, until)

    def poll(self) -> dict[str, Any] | None:
        """Read the status if it is due; see the class docstring.

        Raises:
            StatusUnknown: the deadline has passed; its message names the attempts, the
                last error and the last status read.
        """
        now = self.clock()
        if self.finished:
            return None
        if now >= self.deadline:
            raise StatusUnknown(self.give_up_message(now))
        if now < self.next_read_at:
            return None
        timeout = min(self.policy.attempt_timeout(self.failures, self._base_timeout),
                      max(1.0, self.deadline - now))
        self.attempts += 1
        try:
            record = self.read(timeout)
        except StatusReadError as err:
            self.failures += 1
            self.total_failures += 1
            self.last_error = str(err)
            wait = self.policy.backoff(self.failures)
            self.next_read_at = self.clock() + wait
            logger.warning(
                "status of %s unknown (attempt %d: %s); asking again in %.0f s (until %.0f s "
                "from now, then the launcher gives up)", self.what, self.attempts, err, wait,
                max(0.0, self.deadline - self.clock()),
            )
            return None
        self.failures = 0
        self._base_timeout = timeout
        self.record = dict(record)
        self.status = str(record.get("status", UNKNOWN))
        self.last_read_at = self.clock()
        self.next_read_at = self.last_read_at + self._interval
        return self.record

    def give_up_message(self, now: float | None = None) -> str:
        """Why the tracker stops: what it tried and what it last knew."""
        now = self.clock() if now is None else now
        last = (f"the last status read was {self.status!r}, {now - self.last_read_at:.0f} s ago"
                if self.last_read_at is not None else "no read ever succeeded")
        tried = (f"{self.total_failures} of {self.attempts} reads failed"
                 + (f" (last: {self.last_error})" if self.last_error else ""))
        return (f"gave up reading the status of {self.what} at its deadline: {tried}; {last}. "
                "The run's real status is unknown to the launcher")
