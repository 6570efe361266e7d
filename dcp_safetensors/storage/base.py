"""The storage contract: what the writer, the reader and the commit need of a backend.

A backend is a :class:`Storage`. DCP's save reaches it through
:class:`~dcp_safetensors.writer.SafetensorsWriter` in this order::

    coordinator  begin_save(snapshot, files) -> SaveSession
                                        clean up what crashed saves left (recover),
                                        prepare the save's staging, refuse a second
                                        live writer; the session travels to every
                                        rank inside its plan
    all ranks    part_writer(session).write(part, views, crc32) ... .close()
                                        each rank's parts and their CRC-32s (object
                                        stores send them for the server to check);
                                        write returns a part's tag (an ETag on S3,
                                        else None); on POSIX
                                        (min_part 1) .write_runs(file, offsets,
                                        length, data) instead: a rank's chunk
                                        runs where they lie (RunWriter)
    coordinator  write_small(session, name, data)   objects.json, config.json
    coordinator  commit_save(session, files, etags, index, checksums)
                                        the commit point, then publish
    any rank     abort_save(session)    after a failure before the commit point

and a load (:class:`~dcp_safetensors.reader.SafetensorsReader`) reads through
``recover(writer=False)`` (finish a crashed save's commit; find a live
publish), ``open_read``/``open_staged`` (one handle per file, pinned to one
version) and the plain reads (``exists``, ``size``, ``listdir``, ...).

``min_part`` is the smallest byte run one writer may put into a file (1 on
POSIX, 5 MiB for S3 multipart parts, the whole file where a file has one
writer); ``max_part`` the largest part; ``read_batch`` how many bytes of
neighbouring small chunks one read may merge (0: read each chunk alone);
``read_span`` how many bytes one read of a column shard's rows spans (the
rows and the other ranks' columns between them, in a temporary buffer).

Every backend passes the same conformance suite (``tests/test_storage_contract.py``).

Example:
    >>> import tempfile
    >>> from dcp_safetensors.storage import open_storage
    >>> s = open_storage(tempfile.mkdtemp())
    >>> isinstance(s, Storage), s.min_part
    (True, 1)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dcp_safetensors.layout import PartPlan

__all__ = ["Storage", "SaveSession", "ReadHandle", "PartWriter", "RunWriter", "PartTags"]


@dataclass
class SaveSession:
    """One save's state that every rank needs: its snapshot id and where it stages.

    ``staging`` is the staging directory (POSIX) or the prefix of the commit
    record (object stores). ``uploads`` maps each file to its multipart upload
    (S3), ``small`` holds small files until the commit record publishes them
    (S3), ``committed`` is set once the commit point is passed.
    """

    snapshot: str
    staging: str
    uploads: dict[str, str] = field(default_factory=dict)
    small: dict[str, bytes] = field(default_factory=dict)
    committed: bool = False


class ReadHandle(Protocol):
    """A file open for reading: every read sees the version opened (``etag``: its tag, if the store has one)."""

    path: str
    size: int
    etag: str | None

    def readinto(self, offset: int, buffer: Any) -> None:
        """Fill ``buffer`` from ``offset``; EOFError if the file is shorter."""

    def close(self) -> None:
        """Release the handle (a file descriptor on POSIX; nothing on object stores)."""


PartTags = dict[str, list[tuple[int, Any, int]]]
"""``{file: [(part number, tag, CRC-32), ...]}``: every part of a save, as the commit gets them."""


class PartWriter(Protocol):
    """A rank's writes of one save."""

    def write(self, part: PartPlan, views: Sequence[memoryview], crc32: int) -> str | None:
        """Write ``part`` (its bytes: ``views`` back to back, whose CRC-32 is ``crc32``); returns its tag (S3: ETag).

        Object stores send ``crc32`` with the bytes, so the server refuses a
        part that arrives other than it left; files need no such check.
        """

    def close(self) -> None:
        """Make every written part durable (POSIX: fsync); called once, after the last write."""


@runtime_checkable
class RunWriter(PartWriter, Protocol):
    """A rank's writes of one save to storage that takes a run of any size at any offset (``min_part`` 1)."""

    def write_runs(self, file: str, offsets: Sequence[int], length: int, data: memoryview) -> None:
        """Write ``data[i * length : (i + 1) * length]`` at ``offsets[i]`` of ``file``, for every ``i``."""


class Storage(ABC):
    """A checkpoint's location; every name is relative to it. See the module docstring for who calls what."""

    min_part: int
    max_part: int | None
    read_batch: int
    read_span: int

    # -- reading ------------------------------------------------------------------------

    @abstractmethod
    def path(self, name: str) -> str:
        """The full path or URL of ``name`` (for messages)."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int:
        """Bytes of ``name``; MissingFileError if absent."""

    @abstractmethod
    def listdir(self, name: str = "") -> list[str]:
        """Sorted entries directly under ``name`` (empty if it does not exist)."""

    @abstractmethod
    def walk_files(self, name: str) -> Iterable[str]:
        """Names of every file below ``name``."""

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)``; EOFError if the file is shorter, MissingFileError if absent."""

    @abstractmethod
    def readinto(self, name: str, offset: int, buffer: Any) -> None:
        """Fill ``buffer`` with the bytes from ``offset``; EOFError if the file is shorter."""

    @abstractmethod
    def open_read(self, name: str, etag: str | None = None, size: int | None = None) -> ReadHandle:
        """Open ``name`` so that every read sees this version (with ``etag``: that version, else
        CheckpointChangedError; with its ``size`` too, nothing is requested until the first read)."""

    @abstractmethod
    def open_staged(self, staging: str, name: str) -> ReadHandle:
        """The copy of ``name`` a committed, unpublished save holds in ``staging``; MissingFileError if none."""

    def stored_crc32(self, name: str, etag: str | None = None) -> int | None:
        """The CRC-32 of all of ``name`` that the store checked against its bytes when it was written, or None.

        Object stores that keep full-object checksums (S3 ``FULL_OBJECT``,
        which our saves send) return it, and ``verify`` compares it with the
        index instead of reading the file. Files have none: only reading
        them checks them.
        """
        return None

    # -- saving -------------------------------------------------------------------------

    @abstractmethod
    def recover(self, *, writer: bool) -> str | None:
        """Finish commits whose writer died (writers also drop what uncommitted saves left); returns the
        staging of a committed save whose live writer is publishing it, if any."""

    @abstractmethod
    def begin_save(self, snapshot: str, files: Sequence[str]) -> SaveSession:
        """Coordinator, before any rank writes."""

    @abstractmethod
    def part_writer(self, session: SaveSession) -> PartWriter:
        """Every rank, for its parts of the save."""

    @abstractmethod
    def write_small(self, session: SaveSession, name: str, data: bytes) -> None:
        """Coordinator: a small file of the save, published with it."""

    @abstractmethod
    def commit_save(
        self,
        session: SaveSession,
        files: Sequence[str],
        etags: PartTags,
        index: bytes,
        checksums: Mapping[str, int],
    ) -> None:
        """Coordinator, once every rank's parts are durable: make the save the checkpoint.

        ``etags`` lists ``(part number, tag, CRC-32)`` of every part of every
        file and ``checksums`` each tensor file's CRC-32 (S3 completes its
        uploads from them, the server checking each file's CRC-32).
        """

    @abstractmethod
    def abort_save(self, session: SaveSession) -> None:
        """Undo an uncommitted save (idempotent); a committed one is left to be published."""
