"""POSIX storage: every rank ``pwrite``s its own byte runs into shared files.

Files are opened without truncation, so ranks writing disjoint runs of one
file never clobber each other and nothing moves between ranks
(``min_part = 1``). Reads are ``preadv`` straight into the caller's buffer.

Example:
    >>> import tempfile
    >>> s = LocalStorage(tempfile.mkdtemp())
    >>> with s.open_for_write("a/f.bin") as f:
    ...     f.pwrite(b"world", 6); f.pwrite(b"hello ", 0); f.fsync()
    >>> s.read_range("a/f.bin", 0, 11), s.size("a/f.bin")
    (b'hello world', 11)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

from dcp_safetensors.errors import MissingFileError

__all__ = ["LocalStorage", "WritableFile"]


class WritableFile:
    """An open file that several ranks may write at disjoint offsets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    def pwrite(self, data: Any, offset: int) -> None:
        """Write all of ``data`` (any buffer) at ``offset``."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

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


class LocalStorage:
    """A checkpoint directory on a POSIX filesystem; names are relative to ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def size(self, name: str) -> int:
        try:
            return os.stat(self.path(name)).st_size
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: file is missing") from None

    def list(self, name: str = "") -> list[str]:
        """Entries of directory ``name`` (empty if it does not exist)."""
        try:
            return sorted(os.listdir(self.path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []

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

    def replace(self, src: str, dst: str) -> None:
        os.makedirs(os.path.dirname(self.path(dst)), exist_ok=True)
        os.replace(self.path(src), self.path(dst))

    def remove(self, name: str) -> None:
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            pass

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
