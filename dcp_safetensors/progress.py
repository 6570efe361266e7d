"""A rank's bytes in a save or a load, watched: a slow operation reports its rate, a stalled one says so.

A request to a stopped server, a hung NFS or Lustre mount, or a rank waiting in
a collective for a peer that stalled looks the same from outside: the job
stops and nothing is logged. Request timeouts end some of these (S3's, see
:mod:`~dcp_safetensors.storage.breaker`), not all, and not at once. So every
rank counts the bytes it writes or reads, and a thread beside it logs a
WARNING after ``stall_warning`` seconds without a byte (and again every as
many seconds), naming the operation, the rank, the bytes done and what the
rank was doing; then INFO when bytes flow again. Independently, an operation
that runs long logs its bytes and rate every ``report_every`` seconds.

Example:
    >>> with Progress("save of /tmp/ckpt", total=4 << 20, rank=0) as progress:
    ...     progress.add(4 << 20)
    >>> progress.done
    4194304
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

__all__ = ["Progress", "STALL_WARNING", "REPORT_EVERY"]

logger = logging.getLogger("dcp_safetensors")

STALL_WARNING = 30.0
"""Default seconds without a byte written or read after which a rank logs a WARNING."""

REPORT_EVERY = 30.0
"""Seconds between a long save's or load's progress lines (INFO on rank 0, DEBUG elsewhere)."""


class Progress:
    """Bytes done by one rank in one save or load; a thread logs the rate and any stall (module docstring).

    Args:
        what: the operation, as logs name it (``"save of s3://bucket/step-100"``).
        total: the bytes this rank will move.
        rank: this rank, named in every line.
        stall_warning: seconds without progress before a WARNING; None or 0: never.
        report_every: seconds between progress lines; None or 0: never.
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        rank: int,
        stall_warning: float | None = STALL_WARNING,
        report_every: float | None = REPORT_EVERY,
    ) -> None:
        self.what = what
        self.total = total
        self.rank = rank
        self.stall_warning = stall_warning or 0.0
        self.report_every = report_every or 0.0
        self.done = 0
        self.doing = "writing" if what.startswith("save") else "reading"
        """What the rank is at (named in a stall warning): set by the caller as it moves between phases."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._last = time.monotonic()

    def add(self, nbytes: int) -> None:
        """``nbytes`` more are written or read (any thread)."""
        with self._lock:
            self.done += nbytes
            self._last = time.monotonic()

    def start(self) -> None:
        """Start watching (the clock of a stall starts now)."""
        self._started = self._last = time.monotonic()
        if self._thread is None and (self.stall_warning > 0 or self.report_every > 0):
            self._thread = threading.Thread(target=self._watch, name="dcp-safetensors-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (idempotent; fine if never started)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _line(self) -> str:
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.what} (rank {self.rank}): {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB{percent}"

    def _watch(self) -> None:
        intervals = [s for s in (self.stall_warning, self.report_every) if s > 0]
        tick = min(1.0, *(s / 4 for s in intervals))
        next_report = self._started + self.report_every
        warned_at = 0.0  # the stall's length at the last warning; 0: none since the last byte
        last_seen = self._last
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                last = self._last
            if last != last_seen:
                if warned_at:
                    logger.info("%s: progressing again after %.0f s without", self._line(), warned_at)
                warned_at, last_seen = 0.0, last
            idle = now - last
            if self.stall_warning > 0 and idle >= warned_at + self.stall_warning:
                warned_at = idle
                logger.warning(
                    "%s, no progress for %.0f s while %s: the storage or another rank has stopped answering (S3 "
                    "requests time out after storage_options' config_kwargs read_timeout, 15 s by default; a "
                    "stopped mount or a stalled rank may never); still waiting",
                    self._line(), idle, self.doing,
                )
            if self.report_every > 0 and now >= next_report:
                next_report = now + self.report_every
                rate = self.done / 1e6 / max(now - self._started, 1e-9)
                logger.log(logging.INFO if self.rank == 0 else logging.DEBUG,
                           "%s, %.0f MB/s so far", self._line(), rate)
