"""The commit: how a save becomes the checkpoint at one instant, on any kind of storage.

Writing N files is not atomic on any storage, so the commit does not depend
on it. Every kind of storage implements the same three-step protocol
(:class:`Commit`), with its own primitives:

1. **Stage.** Ranks write the new snapshot where no reader looks: a staging
   directory ``.dcp_safetensors-staging-<snapshot>/`` (POSIX), or multipart
   uploads that stay invisible until completed (S3). Nothing of the current
   checkpoint changes.
2. **Commit point.** The coordinator makes one durable record of everything
   needed to publish the snapshot (:class:`CommitRecord`: the files, and on
   S3 the uploads, their part ETags, the small files and the index). Before
   it, any failure leaves the old checkpoint; after it, the save is the
   checkpoint, and a failure is finished, never undone.
3. **Publish** (:meth:`Commit.roll_forward`): the old index goes first (a
   tool that knows nothing of staging sees no index rather than old index
   over new files), then the data files, then the new index; stale files of
   older snapshots are removed, and the record last. Every step is
   idempotent, so a publish a crash interrupted is finished by whoever comes
   next (:meth:`Commit.recover`).

Only a dead writer's commit is finished by someone else: a live writer holds
an ``flock`` on its staging directory (POSIX; the kernel drops it when the
process dies) or is trusted for a lease after its record's PUT (object
stores, which cannot tell). A reader that meets a live publish reads the
committed snapshot through its record (:meth:`~dcp_safetensors.storage.base.Storage.open_staged`).

Implementations: :class:`~dcp_safetensors.storage.rename_commit.RenameCommit`
(POSIX: rename from staging) and :class:`~dcp_safetensors.storage.record_commit.RecordCommit`
(object stores: complete uploads from the record).

Example:
    >>> record = CommitRecord("abc", ["model.safetensors"])
    >>> CommitRecord.decode(record.encode(), "COMMIT.json").files
    ['model.safetensors']
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcp_safetensors.errors import CheckpointCorruptError
from dcp_safetensors.names import (
    BUILDING_PREFIX,
    COMMIT_RECORD,
    INDEX_NAME,
    LOCK_FILE,
    STAGING_PREFIX,
    TRAINING_STATE_DIR,
)

if TYPE_CHECKING:
    from dcp_safetensors.storage.base import PartTags, SaveSession, Storage

__all__ = [
    "INDEX_NAME",
    "STAGING_PREFIX",
    "BUILDING_PREFIX",
    "COMMIT_RECORD",
    "LOCK_FILE",
    "TRAINING_STATE_DIR",
    "staging_name",
    "stale_files",
    "CommitRecord",
    "Commit",
]

logger = logging.getLogger("dcp_safetensors")

# Files a save owns and replaces, as save_pretrained replaces its shards; nothing else is deleted.
_OWNED_TOP_LEVEL = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def staging_name(snapshot: str) -> str:
    """The staging directory (or prefix) of a save, relative to the checkpoint root."""
    return STAGING_PREFIX + snapshot


def stale_files(storage: Storage, published: Sequence[str]) -> list[str]:
    """Files of older snapshots that a save publishing ``published`` removes (model shards, training state)."""
    keep = set(published)
    stale = [f for f in storage.listdir() if _OWNED_TOP_LEVEL.match(f) and f not in keep]
    return stale + [f for f in storage.walk_files(TRAINING_STATE_DIR) if f not in keep]


@dataclass
class CommitRecord:
    """What the commit point makes durable: everything needed to publish the snapshot.

    ``files`` are published in order. ``writer`` says which process committed
    (host, pid). On object stores the record also carries ``uploads``
    (``{file: {"upload_id": ..., "parts": [[number, etag, crc32], ...],
    "crc32": file crc32}}``; records of versions before checksums have
    ``[number, etag]`` pairs and no ``crc32``), the
    ``small`` files and the ``index``, which POSIX keeps as files in staging.
    """

    snapshot: str
    files: list[str]
    writer: dict[str, Any] = field(default_factory=lambda: {"host": socket.gethostname(), "pid": os.getpid()})
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    small: dict[str, bytes] = field(default_factory=dict)
    index: bytes | None = None

    def encode(self) -> bytes:
        record: dict[str, Any] = {"snapshot": self.snapshot, "writer": self.writer, "files": self.files}
        if self.uploads:
            record["uploads"] = self.uploads
        if self.small:
            record["small"] = {name: base64.b64encode(data).decode() for name, data in self.small.items()}
        if self.index is not None:
            record["index"] = base64.b64encode(self.index).decode()
        return json.dumps(record).encode()

    @classmethod
    def decode(cls, raw: bytes, source: str) -> CommitRecord:
        """Parse a record read from ``source``; CheckpointCorruptError if it is not one."""
        try:
            record = json.loads(raw)
            files = record["files"]
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise TypeError("file names must be strings")
            return cls(
                snapshot=str(record["snapshot"]),
                files=files,
                writer=dict(record.get("writer") or {}),
                uploads=dict(record.get("uploads") or {}),
                small={k: base64.b64decode(v) for k, v in (record.get("small") or {}).items()},
                index=base64.b64decode(record["index"]) if "index" in record else None,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointCorruptError(f"{source}: unreadable commit record ({e})") from None

    @classmethod
    def read(cls, storage: Storage, staging: str) -> CommitRecord:
        """The record of the save staged at ``staging``."""
        name = f"{staging}/{COMMIT_RECORD}"
        return cls.decode(storage.read_range(name, 0, storage.size(name)), storage.path(name))


class Commit(ABC):
    """The commit protocol on one kind of storage (see the module docstring)."""

    @abstractmethod
    def commit(self, session: SaveSession, files: Sequence[str], etags: PartTags, index: bytes,
               checksums: Mapping[str, int]) -> None:
        """Coordinator: pass the commit point for ``session`` (its parts durable), then publish."""

    @abstractmethod
    def roll_forward(self, staging: str) -> None:
        """Publish the committed save at ``staging`` (idempotent; safe to repeat after a crash)."""

    @abstractmethod
    def recover(self, *, writer: bool, own: str | None = None) -> str | None:
        """Finish what crashed saves left; return the staging of a committed save whose live writer is
        publishing it (readers read through it). ``own``: the calling writer's staging, skipped."""
