"""The commit on S3 (:class:`RecordCommit`): one PUT of the commit record, then publishing from it.

The protocol is :mod:`dcp_safetensors.commit`'s; this is its implementation
with :class:`~dcp_safetensors.storage.s3.S3Storage`'s requests (multipart
uploads completed from the record, conditional reads), and the recovery
that finishes committed records a crash left, by a lease
(:data:`PUBLISH_LEASE`) since an object store cannot tell a live writer.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import posixpath
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dcp_safetensors.checksum import crc32_base64
from dcp_safetensors.commit import Commit, CommitRecord
from dcp_safetensors.errors import (
    BucketNotFoundError,
    CheckpointCorruptError,
    MissingFileError,
    StorageAccessError,
    StorageError,
)
from dcp_safetensors.names import COMMIT_RECORD, INDEX_NAME, STAGING_PREFIX
from dcp_safetensors.storage.base import PartTags, SaveSession
from dcp_safetensors.storage.fsspec import each

if TYPE_CHECKING:
    from dcp_safetensors.storage.s3 import S3Storage

__all__ = ["RecordCommit", "PUBLISH_LEASE"]

logger = logging.getLogger("dcp_safetensors")

PUBLISH_LEASE = 20.0
"""Seconds after its commit record's PUT during which a reader leaves a save's publish to its
writer (an object store cannot tell whether that process lives); after it, a reader takes over."""


class RecordCommit(Commit):
    """The commit on S3: one PUT of the commit record, then publishing from it.

    An object store cannot tell whether a writer lives. Writers finish every
    committed record they find; readers leave a record younger than
    :data:`PUBLISH_LEASE` (by the server's clock) to its writer, unless that
    writer ran on the reader's host and its process is gone, and read the
    new snapshot through the record meanwhile.
    """

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage

    def commit(self, session: SaveSession, files: Sequence[str], etags: PartTags, index: bytes,
               checksums: Mapping[str, int]) -> None:
        s = self.storage
        record = CommitRecord(
            session.snapshot,
            list(files),
            uploads={f: {"upload_id": u, "parts": sorted(etags.get(f, [])), "crc32": checksums[f]}
                     for f, u in session.uploads.items()},
            small=dict(session.small),
            index=index,
        )
        try:
            name = posixpath.join(session.staging, COMMIT_RECORD)
            s.retry("PutObject", name, s.fs.pipe_file, s.path(name), record.encode())
        except BaseException:
            s.abort_save(session)
            raise
        # Past the commit point the uploads belong to the record: a failure while rolling
        # forward leaves them for the next reader or writer to complete, never to abort.
        session.committed = True
        try:
            self._publish(session.staging, record, resumed=False)
        except StorageError as e:
            raise type(e)(
                f"{e}. This save is committed all the same: its record {s.path(name)} holds it, and the next load or "
                f"save of {s.url} finishes publishing it (until then other tools find no index there)"
            ) from e

    def roll_forward(self, staging: str) -> None:
        self._publish(staging, CommitRecord.read(self.storage, staging), resumed=True)

    def _publish(self, staging: str, record: CommitRecord, *, resumed: bool) -> None:
        s = self.storage
        index = record.index or b""
        # Without an index no tool mixes old and new files while uploads complete. A fresh
        # commit's index is new (a new snapshot id); a resumed one may find its own published.
        if not resumed or (s.exists(INDEX_NAME) and s.read_range(INDEX_NAME, 0, s.size(INDEX_NAME)) != index):
            s.retry("DeleteObject", INDEX_NAME, s.fs.rm_file, s.path(INDEX_NAME))

        def complete(f: str, upload: dict[str, Any]) -> None:
            # The server assembles the file and checks it against our full-object CRC-32 (BadDigest).
            # A record of a version before checksums lists [number, ETag] and no CRC-32: its upload
            # was made without a checksum algorithm and completes as it was made.
            checked = "crc32" in upload
            parts = [{"PartNumber": p[0], "ETag": p[1], **({"ChecksumCRC32": crc32_base64(p[2])} if checked else {})}
                     for p in upload["parts"]]
            whole = {"ChecksumCRC32": crc32_base64(upload["crc32"]), "ChecksumType": "FULL_OBJECT"} if checked else {}
            try:
                s.s3("CompleteMultipartUpload", f, "complete_multipart_upload",
                     UploadId=upload["upload_id"], MultipartUpload={"Parts": parts}, **whole)
            except (StorageAccessError, BucketNotFoundError):
                raise  # asking whether it completed would be refused too
            except (FileNotFoundError, StorageError):
                if not s.exists(f):  # not completed by an earlier roll-forward either
                    raise

        # S3 assembles each file on CompleteMultipartUpload (seconds for a multi-GB file).
        each(lambda fu: complete(*fu), list(record.uploads.items()))
        for name, data in record.small.items():
            s.retry("PutObject", name, s.fs.pipe_file, s.path(name), data)
        s.publish_index(index, record.files)
        # The record is the staging prefix's only object. Stores with real directories
        # (SeaweedFS) keep the emptied one until the "directory object" is deleted too.
        name = posixpath.join(staging, COMMIT_RECORD)
        s.retry("DeleteObject", name, s.fs.rm_file, s.path(name))
        bucket, key = s.bucket_key(staging)
        s.retry("DeleteObject", staging, s.client.call, "delete_object", Bucket=bucket, Key=key + "/")
        s.fs.invalidate_cache(s.url)

    def recover(self, *, writer: bool, own: str | None = None) -> str | None:
        """Finish committed records (writers: all; readers: past the lease or of a dead local writer);
        writers also abort the uploads an uncommitted save left open. Returns a record a live writer
        is publishing, for readers to read through."""
        s = self.storage
        s.fs.invalidate_cache()
        publishing = None
        for entry in s.listdir():
            if not entry.startswith(STAGING_PREFIX) or entry == own:
                continue
            age = self._age(posixpath.join(entry, COMMIT_RECORD))
            if age is None:
                continue
            if writer or age > PUBLISH_LEASE or self._writer_died(entry):
                logger.warning("completing the commit of %s left by an interrupted save", entry)
                self.roll_forward(entry)
            else:
                publishing = entry
        if writer:
            s.abort_open_uploads()
        return publishing

    def _writer_died(self, staging: str) -> bool:
        """Whether the process that committed ``staging`` is known dead: it ran on this host and is gone."""
        try:
            owner = CommitRecord.read(self.storage, staging).writer
        except (CheckpointCorruptError, MissingFileError):
            return False
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False  # another host: only the lease tells
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def _age(self, name: str) -> float | None:
        """Seconds since ``name`` was written, by the server's clock (None if it does not exist)."""
        try:
            response = self.storage.s3("HeadObject", name, "head_object")
        except FileNotFoundError:
            return None
        now = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if now is None:
            return math.inf
        return float((email.utils.parsedate_to_datetime(now) - response["LastModified"]).total_seconds())
