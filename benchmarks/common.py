"""Helpers shared by the benchmarks: peak-RSS sampling, page-cache eviction, ports, sizes, storage kinds."""

from __future__ import annotations

import os
import socket
import threading
import time

import psutil


class PeakRSS:
    """Samples this process's RSS every 5 ms inside a ``with`` block; ``extra`` is peak minus start."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def evict(path: str) -> None:
    """Flush every file under ``path`` to disk and drop it from the page cache, so a load reads the disk."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tree_bytes(path: str) -> int:
    """Total size of the files under ``path`` (what a save left on disk)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def io_bytes() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process has caused at the block layer (``/proc/self/io``)."""
    counters = psutil.Process().io_counters()
    return counters.read_bytes, counters.write_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage_of(path: str) -> tuple[str, str]:
    """``("tmpfs" | "disk", filesystem type)`` of the mount holding ``path`` (``/proc/mounts``).

    tmpfs and ramfs are "tmpfs" (memory: the software's cost without the disk's); anything else
    is "disk". Without ``/proc/mounts``, a path under ``/dev/shm`` is taken for tmpfs.
    """
    real = os.path.realpath(path)
    mount, fs = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(mount):
                    mount, fs = point, fields[2]
    except OSError:
        pass
    if not fs:
        fs = "tmpfs" if real == "/dev/shm" or real.startswith("/dev/shm/") else "unknown"
    return ("tmpfs" if fs in ("tmpfs", "ramfs") else "disk"), fs
