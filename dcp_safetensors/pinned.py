"""One load's view of a checkpoint: every file opened once, every read of it from that version.

A save that overwrites a checkpoint replaces its files while a load may be
reading them: by rename on POSIX, by completing an upload over the key on S3.
A load that checked a file's header and later read its data by path could get
the new snapshot's bytes at the old header's offsets, a silently mixed state
dict. :class:`PinnedFiles` opens each file once, on first use, and serves
every later read of it from that handle: on POSIX an open descriptor (a
replaced file's inode stays readable until closed), on S3 ranged GETs made
conditional on the ETag seen first (``If-Match``), so a replaced object fails
with :class:`~dcp_safetensors.errors.CheckpointChangedError` instead of
serving new bytes.

Ranks other than the one that read the headers open their files later: they
pin to what that rank saw, by ETag on object stores and by comparing the
header on POSIX (see :class:`~dcp_safetensors.reader.SafetensorsReader`).

A committed save that a live process is still publishing is read through its
staging copy (``staging``): each file from there, or from its final place
once it has been moved, so a load during the publish gets the new snapshot
rather than no checkpoint.

Example:
    >>> import os, tempfile
    >>> from dcp_safetensors.storage import LocalStorage
    >>> s = LocalStorage(tempfile.mkdtemp())
    >>> s.write_file("f.bin", b"old bytes")
    >>> files = PinnedFiles(s)
    >>> files.size("f.bin")
    9
    >>> s.write_file("new.bin", b"NEW BYTES"); os.replace(s.path("new.bin"), s.path("f.bin"))
    >>> files.read_range("f.bin", 0, 3), s.read_range("f.bin", 0, 3)
    (b'old', b'NEW')
    >>> files.close()
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
from collections.abc import Mapping
from typing import Any

from dcp_safetensors.errors import MissingFileError
from dcp_safetensors.storage.base import ReadHandle

__all__ = ["PinnedFiles"]


class PinnedFiles:
    """The files of one checkpoint as one load reads them: each opened once, on first use.

    Offers the reads of a storage backend (``exists``, ``size``,
    ``read_range``, ``readinto``, ``path``, ``listdir``), so the code that
    reads a checkpoint takes either. Thread-safe.

    Args:
        storage: the checkpoint's backend.
        staging: a committed save's staging directory whose publish is under
            way: every file is read from there, or from its final place once
            moved.
        etags: the version of each file the coordinator read (object stores):
            a read of another version raises ``CheckpointChangedError``.
        sizes: the sizes of those versions, so opening one costs no request.
    """

    def __init__(
        self,
        storage: Any,
        *,
        staging: str | None = None,
        etags: Mapping[str, str] | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.storage = storage
        self.staging = staging
        self.etags = dict(etags or {})
        self.sizes = dict(sizes or {})
        self.read_batch: int = storage.read_batch
        self.read_span: int = storage.read_span
        self._handles: dict[str, ReadHandle] = {}
        self._lock = threading.Lock()

    def _handle(self, name: str) -> ReadHandle:
        with self._lock:
            handle = self._handles.get(name)
        if handle is not None:
            return handle
        handle = self._open(name)
        with self._lock:
            kept = self._handles.setdefault(name, handle)
        if kept is not handle:  # another thread opened it first
            handle.close()
        return kept

    def _open(self, name: str) -> ReadHandle:
        if self.staging is not None:
            # MissingFileError: moved to its final place already (or never staged): read it there.
            with contextlib.suppress(MissingFileError):
                return self.storage.open_staged(self.staging, name)
        return self.storage.open_read(name, self.etags.get(name), self.sizes.get(name))

    def path(self, name: str) -> str:
        handle = self._handles.get(name)
        return handle.path if handle is not None else self.storage.path(name)

    def is_open(self, name: str) -> bool:
        """Whether this load has opened ``name`` (and pinned its version)."""
        return name in self._handles

    def exists(self, name: str) -> bool:
        try:
            self._handle(name)
        except MissingFileError:
            return False
        return True

    def size(self, name: str) -> int:
        return self._handle(name).size

    def etag(self, name: str) -> str | None:
        """The version tag of the copy of ``name`` this load reads (None on POSIX)."""
        return self._handle(name).etag

    def is_staged(self, name: str) -> bool:
        """Whether ``name`` is read from a staging copy (its publish had not moved it yet)."""
        return self.staging is not None and self._handle(name).path.startswith(
            self.storage.path(posixpath.join(self.staging, ""))
        )

    def readinto(self, name: str, offset: int, buffer: Any) -> None:
        self._handle(name).readinto(offset, buffer)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(name, offset, buffer)
        return bytes(buffer)

    def listdir(self, name: str = "") -> list[str]:
        return list(self.storage.listdir(name))

    def close(self) -> None:
        """Close every handle (a load's last read is done)."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()
