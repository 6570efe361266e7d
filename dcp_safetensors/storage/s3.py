"""S3: multipart uploads written by the ranks that hold the bytes, committed by one record.

A save is one multipart upload per file, created by the coordinator; each rank
uploads the parts the layout gave it (``UploadPart``, every part but the last
>= 5 MiB), each with the CRC-32 computed as its bytes were read out of the
tensors, and every upload completes as a full-object CRC-32: the server
checks each part and each whole file on receipt (``BadDigest``), so bytes
that change between the tensors and the disks of the store never publish. A data file is an upload to its final key, invisible until
completed, so nothing of the previous checkpoint changes while ranks upload.
The commit (:class:`~dcp_safetensors.storage.record_commit.RecordCommit`)
PUTs one record (``.dcp_safetensors-staging-<snapshot>/COMMIT.json``: upload
ids and part ETags, the small files, the index): **that PUT is the commit
point**. Rolling forward then deletes the old index, completes the uploads,
PUTs the small files and the index, and deletes files of older snapshots and
the record; every step is idempotent. Before the commit point any failure aborts every
upload.

Reads are pinned: an object opened once (HEAD: size and ETag) is read with
ranged GETs ``If-Match`` that ETag, so a save that replaces it makes the
read fail (:class:`~dcp_safetensors.errors.CheckpointChangedError`) rather
than return another snapshot's bytes.

Example:
    >>> S3Storage("s3://bucket/run/step-1", {"anon": True}).min_part
    5242880
"""

from __future__ import annotations

import base64
import copy
import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from dcp_safetensors.checksum import crc32_base64
from dcp_safetensors.commit import CommitRecord, staging_name
from dcp_safetensors.errors import (
    ConcurrentSaveError,
    ConfigurationError,
    MissingFileError,
    StorageError,
)
from dcp_safetensors.layout import PartPlan
from dcp_safetensors.names import INDEX_NAME
from dcp_safetensors.storage.base import PartTags, PartWriter, ReadHandle, SaveSession
from dcp_safetensors.storage.fsspec import FsspecStorage, each, error_code
from dcp_safetensors.storage.record_commit import RecordCommit
from dcp_safetensors.storage.s3_client import S3Client

__all__ = ["S3Storage", "S3_MIN_PART"]

logger = logging.getLogger("dcp_safetensors")

S3_MIN_PART = 5 << 20
"""S3 rejects a non-last multipart part smaller than this (``EntityTooSmall``)."""


class _StagedBytes:
    """A small file a committed save holds in its record until it is published (the index, config.json)."""

    etag: str | None = None

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self.size = len(data)
        self._data = data

    def readinto(self, offset: int, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        if offset + view.nbytes > self.size:
            raise EOFError(f"{self.path}: ends before byte {offset + view.nbytes}")
        view[:] = self._data[offset : offset + view.nbytes]

    def close(self) -> None:
        """Nothing to release."""


class _UploadPartWriter:
    """A rank's parts of one save: each an ``UploadPart`` into its file's multipart upload."""

    def __init__(self, storage: S3Storage, session: SaveSession) -> None:
        self._storage = storage
        self._uploads = session.uploads

    def write(self, part: PartPlan, views: Sequence[memoryview], crc32: int) -> str | None:
        data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        s = self._storage
        try:
            response = s.s3(
                f"UploadPart {part.number}",
                part.file,
                "upload_part",
                PartNumber=part.number,
                UploadId=self._uploads[part.file],
                Body=data,
                # The CRC-32 computed as the part was read out of the tensors: the server checks
                # the bytes it received against it (BadDigest), and botocore computes none.
                ChecksumAlgorithm="CRC32",
                ChecksumCRC32=crc32_base64(crc32),
            )
        except FileNotFoundError as e:
            if error_code(e) != "NoSuchUpload":
                raise
            raise ConcurrentSaveError(
                f"{s.path(part.file)}: the multipart upload of this save was aborted by someone else: another save "
                "to this checkpoint (a restarted job?) began and cleaned up uploads it took for abandoned. This save "
                "stopped; nothing of it was published"
            ) from None
        return str(response["ETag"])

    def close(self) -> None:
        """Nothing to flush: a part is durable once UploadPart returns."""


class S3Storage(FsspecStorage):
    """A checkpoint under an ``s3://`` URL (s3fs); names are relative to it.

    Args:
        url: e.g. ``"s3://bucket/prefix/step-100"``.
        storage_options: what ``s3fs.S3FileSystem`` takes (``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``, ...).
        max_part: largest multipart part (default 64 MiB, at least 5 MiB).
        retries: attempts per request for transient failures.
    """

    min_part = S3_MIN_PART

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        max_part: int | None = 64 << 20,
        retries: int = 6,
    ) -> None:
        super().__init__(url, storage_options, retries=retries)
        # Our retry layer (FsspecStorage.retry, the endpoint breaker) is the one policy for s3fs's
        # requests too: botocore's retries (5) under s3fs's own (5) made a dead endpoint's listing
        # or commit record take 16-24 s to fail (measured); the user's config_kwargs win.
        config = copy.deepcopy(self.storage_options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        self.storage_options = {**self.storage_options, "config_kwargs": config}
        max_part = 64 << 20 if max_part is None else max_part
        if max_part < S3_MIN_PART:
            raise ConfigurationError(f"max_part must be at least 5 MiB on S3, got {max_part}")
        self.max_part = max_part
        self.commits = RecordCommit(self)
        self._client: S3Client | None = None

    @property
    def fs(self) -> Any:
        fs = super().fs
        # s3fs's own retries (a class attribute, not an option) would wait out 5 read timeouts of a
        # stopped server per call; this instance is ours (its options hold our retries setting).
        fs.retries = 1
        return fs

    @property
    def client(self) -> S3Client:
        """The client of every request this class makes itself (:mod:`~dcp_safetensors.storage.s3_client`)."""
        if self._client is None:
            self._client = S3Client(self.fs)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_client": None}

    def endpoint(self) -> str:
        return self.client.endpoint

    def bucket_key(self, name: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path(name))
        return bucket, key

    def _where(self, request: str, name: str) -> str:
        bucket, key = self.bucket_key(name)
        return f"{request} of {self.path(name)} (bucket {bucket!r}, key {key!r}) at {self.client.endpoint}"

    def s3(self, request: str, name: str, operation: str, **kwargs: Any) -> Any:
        """One S3 API call about object ``name`` (Bucket and Key filled in), retried."""
        bucket, key = self.bucket_key(name)
        return self.retry(request, name, self.client.call, operation, Bucket=bucket, Key=key, **kwargs)

    # -- reading: pinned to an ETag -----------------------------------------------------

    def head(self, name: str, etag: str | None = None) -> tuple[int, str | None]:
        """``(size, ETag)`` of ``name``; with ``etag``, CheckpointChangedError if it is another version."""
        response = self._head_object(name, etag)
        return int(response["ContentLength"]), str(response["ETag"])

    def _head_object(self, name: str, etag: str | None, **extra: Any) -> Any:
        """``HeadObject`` of ``name`` (``If-Match`` ``etag`` when given); MissingFileError if there is none."""
        condition = {"IfMatch": etag} if etag is not None else {}
        try:
            return self.s3("HeadObject", name, "head_object", **condition, **extra)
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None

    def stored_crc32(self, name: str, etag: str | None = None) -> int | None:
        """The full-object CRC-32 the server checked on receipt (HEAD, ``ChecksumMode=ENABLED``), or None.

        Only a ``FULL_OBJECT`` checksum is the CRC-32 of the whole file; a
        ``COMPOSITE`` one (other tools' multipart uploads) is a CRC of part CRCs.
        """
        response = self._head_object(name, etag, ChecksumMode="ENABLED")
        if response.get("ChecksumType") != "FULL_OBJECT" or "ChecksumCRC32" not in response:
            return None
        return int.from_bytes(base64.b64decode(response["ChecksumCRC32"]), "big")

    def _get(self, request: str, name: str, offset: int, length: int, etag: str | None) -> bytes:
        condition = {"IfMatch": etag} if etag is not None else {}

        def get() -> bytes:
            response = self.client.call("get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}",
                                        **condition)
            with response["Body"] as body:
                return bytes(body.read())

        bucket, key = self.bucket_key(name)
        return self.retry(request, name, get)

    def open_staged(self, staging: str, name: str) -> ReadHandle:
        """The copy of ``name`` the committed save ``staging`` holds in its record, before publishing it.

        Only the index and the small files live there; a data file is an upload completed into its
        final key (MissingFileError here: read it there).
        """
        record = CommitRecord.read(self, staging)
        data = record.index if name == INDEX_NAME else record.small.get(name)
        if data is None:
            raise MissingFileError(f"{self.path(name)}: not in the commit record of {staging}")
        return _StagedBytes(self.path(posixpath.join(staging, name)), data)

    # -- saving -------------------------------------------------------------------------

    def recover(self, *, writer: bool) -> str | None:
        """See :meth:`RecordCommit.recover`."""
        return self.commits.recover(writer=writer)

    def begin_save(self, snapshot: str, files: Sequence[str]) -> SaveSession:
        self.recover(writer=True)
        session = SaveSession(snapshot, staging_name(snapshot))

        def create(f: str) -> None:
            # Completed as a full-object CRC-32: the server checks the whole file against ours.
            response = self.s3("CreateMultipartUpload", f, "create_multipart_upload",
                               ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
            # Recorded as each is made: a failure part-way aborts the ones already made.
            session.uploads[f] = response["UploadId"]

        try:
            each(create, files)
            session.uploads = {f: session.uploads[f] for f in files}  # in file order
        except BaseException:
            self.abort_save(session)
            raise
        return session

    def part_writer(self, session: SaveSession) -> PartWriter:
        return _UploadPartWriter(self, session)

    def write_small(self, session: SaveSession, name: str, data: bytes) -> None:
        session.small[name] = data  # published from the commit record, never before it

    def commit_save(
        self,
        session: SaveSession,
        files: Sequence[str],
        etags: PartTags,
        index: bytes,
        checksums: Mapping[str, int],
    ) -> None:
        """PUT the commit record (the commit point), then roll forward; before it, any failure aborts."""
        self.commits.commit(session, files, etags, index, checksums)

    def abort_save(self, session: SaveSession) -> None:
        """Abort every multipart upload of an uncommitted session (idempotent; an unknown upload is fine)."""
        if session.committed:
            return
        failed: list[StorageError] = []
        for f, upload_id in session.uploads.items():
            try:
                self.abort_upload(f, upload_id)
            except StorageError as e:  # the save's own error is the one to raise
                failed.append(e)
        if failed:
            logger.warning("could not abort %d of this save's %d uploads (the next save to %s aborts them): %s",
                           len(failed), len(session.uploads), self.url, failed[0])

    def abort_upload(self, name: str, upload_id: str) -> None:
        """Abort one multipart upload; one already aborted or completed is fine."""
        try:
            self.s3("AbortMultipartUpload", name, "abort_multipart_upload", UploadId=upload_id)
        except FileNotFoundError:
            # Every rank aborts a failed save's uploads; the first one to get there wins.
            logger.debug("upload of %s already aborted or completed", self.path(name))

    def abort_open_uploads(self) -> None:
        """Abort every multipart upload under the checkpoint (those an interrupted save left open)."""
        bucket, prefix = self.bucket_key("")
        uploads: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:  # a page lists at most 1,000 uploads on S3
            page = self.retry(
                "ListMultipartUploads", "", self.client.call, "list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/", **markers
            )
            uploads += page.get("Uploads", [])
            # Exactly the markers the server returned: SeaweedFS returns no NextKeyMarker, and
            # a KeyMarker made up from the last key makes it list nothing more.
            markers = {m: page[f"Next{m}"] for m in ("KeyMarker", "UploadIdMarker") if page.get(f"Next{m}")}
            if not (page.get("IsTruncated") and markers):
                break
        if uploads:
            logger.warning("aborting %d multipart uploads under %s left open by an interrupted save", len(uploads), self.url)
        # Every abort is a round trip: thousands of them one after another would take minutes.
        each(lambda u: self.abort_upload(u["Key"][len(prefix) + 1 :], u["UploadId"]), uploads)
