"""POSIX storage: every rank ``pwrite``s its own byte runs into shared files.

Files are opened without truncation, so ranks writing disjoint runs of one
file never clobber each other and nothing moves between ranks
(``min_part = 1``). A save writes into a staging directory and commits with
:mod:`dcp_safetensors.commit`. Reads are ``preadv`` straight into the
caller's buffer.

Each written part is handed to the kernel's writeback at once
(``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on Linux), so the disk works
while the rank copies and checksums its next parts; the final ``fsync`` then
waits for the tail only, not for every byte of the save.

Example:
    >>> import tempfile
    >>> s = LocalStorage(tempfile.mkdtemp())
    >>> with s.open_for_write("a/f.bin") as f:
    ...     f.pwrite(b"world", 6); f.pwrite(b"hello ", 0); f.fsync()
    >>> s.read_range("a/f.bin", 0, 11), s.size("a/f.bin")
    (b'hello world', 11)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import posixpath
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dcp_safetensors import commit as commit_protocol
from dcp_safetensors.errors import MissingFileError
from dcp_safetensors.layout import PartPlan

__all__ = ["LocalStorage", "WritableFile"]

logger = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


_start_writeback_fn = _sync_file_range()


class WritableFile:
    """An open file that several ranks may write at disjoint offsets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    def pwrite(self, data: Any, offset: int) -> None:
        """Write all of ``data`` (any buffer) at ``offset``."""
        self.pwritev([memoryview(data).cast("B")], offset)

    def pwritev(self, views: Sequence[memoryview], offset: int) -> None:
        """Write the buffers back to back from ``offset`` (one syscall when the kernel takes it all)."""
        pending = [v for v in views if v.nbytes]
        while pending:
            n = os.pwritev(self._fd, pending, offset)
            offset += n
            while pending and n >= pending[0].nbytes:
                n -= pending[0].nbytes
                pending.pop(0)
            if n:
                pending[0] = pending[0][n:]

    def start_writeback(self, offset: int, length: int) -> None:
        """Ask the kernel to start writing ``[offset, offset + length)`` to disk now, without waiting.

        Only a head start for :meth:`fsync`, which alone makes data durable; on
        systems without ``sync_file_range`` nothing happens.
        """
        if _start_writeback_fn is not None and length > 0:
            if _start_writeback_fn(self._fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
                logger.debug("%s: sync_file_range failed (%s); fsync alone will write it", self.path, os.strerror(ctypes.get_errno()))

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> WritableFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LocalPartWriter:
    """A rank's writes of one save: files in staging opened once, fsynced at close."""

    def __init__(self, storage: LocalStorage, staging: str) -> None:
        self._storage = storage
        self._staging = staging
        self._files: dict[str, WritableFile] = {}
        self._opening = threading.Lock()  # parts of one file are written from several threads

    def write(self, part: PartPlan, views: Sequence[memoryview]) -> str | None:
        with self._opening:
            f = self._files.get(part.file)
            if f is None:
                f = self._files[part.file] = self._storage.open_for_write(posixpath.join(self._staging, part.file))
        f.pwritev(views, part.start)
        f.start_writeback(part.start, part.end - part.start)
        return None

    def close(self) -> None:
        try:
            for f in self._files.values():
                f.fsync()
        finally:
            for f in self._files.values():
                f.close()


class LocalStorage:
    """A checkpoint directory on a POSIX filesystem; names are relative to ``root``.

    ``max_part`` caps the bytes of one write: a rank's range of a file is cut
    into parts of at most this size, written and checksummed concurrently.
    ``read_batch = 0``: a ``pread`` costs microseconds, so every chunk is read
    straight into its destination, never merged with its neighbours.
    """

    min_part = 1
    read_batch = 0

    def __init__(self, root: str | os.PathLike[str], *, max_part: int | None = 64 << 20) -> None:
        self.root = os.fspath(root)
        self.max_part = max_part

    # -- reading ------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def size(self, name: str) -> int:
        try:
            return os.stat(self.path(name)).st_size
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: file is missing") from None

    def listdir(self, name: str = "") -> list[str]:
        """Entries of directory ``name`` (empty if it does not exist)."""
        try:
            return sorted(os.listdir(self.path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(name, offset, buf)
        return bytes(buf)

    def readinto(self, name: str, offset: int, buffer: Any) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset``; EOFError if the file is shorter."""
        view = memoryview(buffer).cast("B")
        try:
            fd = os.open(self.path(name), os.O_RDONLY)
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: file is missing") from None
        try:
            while view.nbytes:
                n = os.preadv(fd, [view], offset)
                if n == 0:
                    raise EOFError(f"{self.path(name)}: file ends before byte {offset + view.nbytes}")
                view = view[n:]
                offset += n
        finally:
            os.close(fd)

    def recover(self, *, discard_uncommitted: bool) -> None:
        """Complete a commit a crash interrupted (and, for writers, drop abandoned staging)."""
        commit_protocol.recover(self, discard_uncommitted=discard_uncommitted)

    # -- saving -------------------------------------------------------------------------

    def begin_save(self, snapshot: str, files: Sequence[str]) -> dict[str, Any]:
        """Coordinator, before any rank writes: clean up, create staging. Returns the session."""
        os.makedirs(self.root, exist_ok=True)
        self.recover(discard_uncommitted=True)
        staging = commit_protocol.staging_name(snapshot)
        for d in {posixpath.dirname(f) for f in files} | {""}:
            os.makedirs(self.path(posixpath.join(staging, d)), exist_ok=True)
        return {"snapshot": snapshot, "staging": staging}

    def part_writer(self, session: dict[str, Any]) -> _LocalPartWriter:
        return _LocalPartWriter(self, session["staging"])

    def write_small(self, session: dict[str, Any], name: str, data: bytes) -> None:
        self.write_file(posixpath.join(session["staging"], name), data)

    def commit_save(
        self, session: dict[str, Any], files: Sequence[str], tokens: dict[str, list[tuple[int, Any]]], index: bytes
    ) -> None:
        """Coordinator, after every rank's writes are durable: the commit (see :mod:`dcp_safetensors.commit`)."""
        self.fsync_dir(session["staging"])
        commit_protocol.commit(self, session["snapshot"], files, index)

    def abort_save(self, session: dict[str, Any]) -> None:
        # Past the commit point (a durable record) the save is the checkpoint: a failed
        # roll-forward is completed by the next writer or reader, never undone.
        if self.exists(posixpath.join(session["staging"], commit_protocol.COMMIT_RECORD)):
            logger.warning("%s: the save committed but was not fully published; the next save or load completes it",
                           self.path(session["staging"]))
            return
        self.remove_tree(session["staging"])

    # -- primitives of the commit protocol ----------------------------------------------

    def makedirs(self, name: str) -> None:
        os.makedirs(self.path(name), exist_ok=True)

    def open_for_write(self, name: str) -> WritableFile:
        os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
        return WritableFile(self.path(name))

    def write_file(self, name: str, data: bytes) -> None:
        """Write a whole small file and make it durable."""
        with self.open_for_write(name) as f:
            f.truncate(0)
            f.pwrite(data, 0)
            f.fsync()

    def replace(self, src: str, dst: str) -> None:
        os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
        os.replace(self.path(src), self.path(dst))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(name))

    def remove_tree(self, name: str) -> None:
        shutil.rmtree(self.path(name), ignore_errors=True)

    def fsync_dir(self, name: str = "") -> None:
        fd = os.open(self.path(name) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def walk_files(self, name: str) -> Iterator[str]:
        """Relative names of every file below directory ``name``."""
        base = self.path(name)
        for dirpath, _, filenames in os.walk(base):
            for f in filenames:
                yield os.path.relpath(os.path.join(dirpath, f), self.root)
