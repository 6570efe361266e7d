"""Object stores through fsspec: S3 multipart uploads written by the ranks that hold the bytes.

On S3 (``s3://``, via ``s3fs``) a save is one multipart upload per file,
created by the coordinator; each rank uploads the parts the layout gave it
(``UploadPart``, every part but the last >= 5 MiB), and the coordinator
commits with the protocol of :mod:`dcp_safetensors.commit`, built from an
object store's primitives: a data file is a multipart upload to its final
key, invisible until completed, so nothing of the previous checkpoint changes
while ranks upload. The coordinator PUTs a commit record
(``.dcp_safetensors-staging-<snapshot>/COMMIT.json``: upload ids and part
ETags, the small files, the index): **that PUT is the commit point**. Rolling
forward then deletes the old index (so no tool sees it over new files),
completes the uploads, PUTs the small files and the index, and deletes files
of older snapshots; every step is idempotent, and the next writer or reader
finishes a roll-forward a crash interrupted. Before the commit point any
failure aborts every upload. Any other fsspec URL takes the generic path: one
writer per file (``min_part`` = the whole file), written in place with one
``pipe_file`` (no crash safety: such stores cannot stage a file).

Transient failures (throttling, 5xx, dropped connections) are retried with
exponential backoff, on top of the client's own retries; a request that
still fails raises :class:`~dcp_safetensors.errors.StorageError` naming it.

Example:
    >>> ObjectStorage("s3://bucket/run/step-1", {"anon": True}).min_part
    5242880
"""

from __future__ import annotations

import base64
import json
import logging
import posixpath
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dcp_safetensors.commit import (
    COMMIT_RECORD,
    INDEX_NAME,
    STAGING_PREFIX,
    staging_name,
    stale_files,
)
from dcp_safetensors.errors import (
    CheckpointCorruptError,
    ConfigurationError,
    MissingFileError,
    StorageError,
)
from dcp_safetensors.layout import PartPlan

__all__ = ["ObjectStorage", "S3_MIN_PART"]

logger = logging.getLogger("dcp_safetensors")

S3_MIN_PART = 5 << 20
"""S3 rejects a non-last multipart part smaller than this (``EntityTooSmall``)."""

READ_BATCH = 8 << 20
"""Neighbouring small chunks of one object are read with one ranged GET of up to this many
bytes: each GET costs a round trip, and ~8 MiB ranges are what S3 serves best in parallel."""

FILE_THREADS = 16
"""Files whose multipart uploads are created, or completed, at once: a checkpoint of
dozens of files would otherwise wait dozens of round trips in a row."""

T = TypeVar("T")


class _ObjectPartWriter:
    def __init__(self, storage: ObjectStorage, session: dict[str, Any]) -> None:
        self._storage = storage
        self._uploads: dict[str, str] = session.get("uploads", {})

    def write(self, part: PartPlan, views: Sequence[memoryview]) -> str | None:
        data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        s = self._storage
        if not s.multipart:
            s.retry(f"write {s.path(part.file)}", s.fs.pipe_file, s.path(part.file), data)
            return None
        bucket, key = s.bucket_key(part.file)
        response = s.retry(
            f"UploadPart {part.number} of {s.path(part.file)}",
            s.fs.call_s3,
            "upload_part",
            Bucket=bucket,
            Key=key,
            PartNumber=part.number,
            UploadId=self._uploads[part.file],
            Body=data,
        )
        return response["ETag"]

    def close(self) -> None:
        """Nothing to flush: a part is durable once UploadPart returns."""


class ObjectStorage:
    """A checkpoint under an fsspec URL; names are relative to it.

    Args:
        url: e.g. ``"s3://bucket/prefix/step-100"``.
        storage_options: passed to the fsspec filesystem (for S3, what
            ``s3fs.S3FileSystem`` takes: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``, ...).
        max_part: largest multipart part (default 64 MiB).
        retries: attempts per request for transient failures.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        max_part: int = 64 << 20,
        retries: int = 6,
    ) -> None:
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self.storage_options = dict(storage_options or {})
        self.multipart = self.protocol in ("s3", "s3a")
        # Generic fsspec targets cannot assemble a file from parts: one writer per file.
        self.min_part = S3_MIN_PART if self.multipart else 1 << 62
        if self.multipart and max_part < S3_MIN_PART:
            raise ConfigurationError(f"max_part must be at least 5 MiB on S3, got {max_part}")
        self.max_part: int | None = max_part if self.multipart else None
        self.read_batch = READ_BATCH
        self.retries = retries
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import fsspec
            except ImportError:
                raise ConfigurationError("object storage needs fsspec: pip install 'dcp-safetensors[s3]'") from None
            try:
                self._fs = fsspec.filesystem(self.protocol, **self.storage_options)
            except ImportError as e:
                raise ConfigurationError(
                    f"{self.protocol}:// needs an extra package ({e}); for S3: pip install 'dcp-safetensors[s3]'"
                ) from None
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None  # clients hold sockets and event loops; each process makes its own
        return state

    def path(self, name: str) -> str:
        return posixpath.join(self.url, name) if name else self.url

    def bucket_key(self, name: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path(name))
        return bucket, key

    def retry(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` retried with exponential backoff on transient failures."""
        delay = 0.1
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except (FileNotFoundError, PermissionError, ConfigurationError):
                raise
            except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types for one transient fault
                if attempt == self.retries:
                    raise StorageError(f"{what}: failed after {attempt} attempts: {type(e).__name__}: {e}") from e
                logger.warning("%s: attempt %d failed (%s: %s); retrying", what, attempt, type(e).__name__, e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    # -- reading ------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return bool(self.retry(f"HEAD {self.path(name)}", self.fs.exists, self.path(name)))

    def size(self, name: str) -> int:
        try:
            return int(self.retry(f"HEAD {self.path(name)}", self.fs.size, self.path(name)))
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None

    def listdir(self, name: str = "") -> list[str]:
        try:
            entries = self.retry(f"LIST {self.path(name)}", self.fs.ls, self.path(name), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def walk_files(self, name: str) -> list[str]:
        """Names (relative to the checkpoint) of every object under ``name``."""
        try:
            found = self.retry(f"LIST {self.path(name)}", self.fs.find, self.path(name))
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.url)
        return sorted(posixpath.relpath(self.fs._strip_protocol(f), root) for f in found)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        try:
            data = self.retry(
                f"GET {self.path(name)} bytes {offset}-{offset + length - 1}",
                self.fs.cat_file,
                self.path(name),
                start=offset,
                end=offset + length,
            )
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None
        if len(data) != length:
            raise EOFError(f"{self.path(name)}: object ends before byte {offset + length}")
        return data

    def readinto(self, name: str, offset: int, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        view[:] = self.read_range(name, offset, view.nbytes)

    def recover(self, *, discard_uncommitted: bool) -> None:
        """Finish commits a crash interrupted; writers also abort uploads an uncommitted save left open."""
        self.fs.invalidate_cache()
        for entry in self.listdir():
            if entry.startswith(STAGING_PREFIX) and self.exists(posixpath.join(entry, COMMIT_RECORD)):
                logger.warning("completing the commit of %s left by an interrupted save", entry)
                self._roll_forward(entry)
        if not (discard_uncommitted and self.multipart):
            return
        bucket, prefix = self.bucket_key("")
        response = self.retry(
            f"ListMultipartUploads {self.url}", self.fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/"
        )
        for upload in response.get("Uploads", []):
            logger.warning("aborting multipart upload of %s left open by an interrupted save", upload["Key"])
            self.retry(
                f"AbortMultipartUpload {upload['Key']}",
                self.fs.call_s3,
                "abort_multipart_upload",
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )

    # -- saving -------------------------------------------------------------------------

    def begin_save(self, snapshot: str, files: Sequence[str]) -> dict[str, Any]:
        self.recover(discard_uncommitted=True)
        session: dict[str, Any] = {"snapshot": snapshot, "uploads": {}, "small": {}}
        if not self.multipart:
            return session

        def create(f: str) -> None:
            bucket, key = self.bucket_key(f)
            response = self.retry(
                f"CreateMultipartUpload {self.path(f)}", self.fs.call_s3, "create_multipart_upload", Bucket=bucket, Key=key
            )
            # Recorded as each is made: a failure part-way aborts the ones already made.
            session["uploads"][f] = response["UploadId"]

        try:
            _each(create, files)
            session["uploads"] = {f: session["uploads"][f] for f in files}  # in file order
        except BaseException:
            self.abort_save(session)
            raise
        return session

    def part_writer(self, session: dict[str, Any]) -> _ObjectPartWriter:
        return _ObjectPartWriter(self, session)

    def write_small(self, session: dict[str, Any], name: str, data: bytes) -> None:
        if self.multipart:
            session["small"][name] = data  # published from the commit record, never before it
        else:
            self.retry(f"PUT {self.path(name)}", self.fs.pipe_file, self.path(name), data)

    def commit_save(
        self, session: dict[str, Any], files: Sequence[str], tokens: dict[str, list[tuple[int, str]]], index: bytes
    ) -> None:
        """PUT the commit record (the commit point), then roll forward; before it, any failure aborts."""
        if not self.multipart:
            self._publish_index(index, files)
            return
        staging = staging_name(session["snapshot"])
        record = {
            "snapshot": session["snapshot"],
            "files": list(files),
            "uploads": {f: {"upload_id": u, "parts": sorted(tokens.get(f, []))} for f, u in session["uploads"].items()},
            "small": {name: base64.b64encode(data).decode() for name, data in session["small"].items()},
            "index": base64.b64encode(index).decode(),
        }
        try:
            name = posixpath.join(staging, COMMIT_RECORD)
            self.retry(f"PUT {self.path(name)}", self.fs.pipe_file, self.path(name), json.dumps(record).encode())
        except BaseException:
            self.abort_save(session)
            raise
        self._roll_forward(staging, dict(record, index_bytes=index, small_bytes=dict(session["small"])))

    def _read_record(self, staging: str) -> dict[str, Any]:
        name = posixpath.join(staging, COMMIT_RECORD)
        try:
            record = json.loads(self.read_range(name, 0, self.size(name)))
            record["index_bytes"] = base64.b64decode(record["index"])
            record["small_bytes"] = {k: base64.b64decode(v) for k, v in record["small"].items()}
            return record
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointCorruptError(f"{self.path(name)}: unreadable commit record ({e})") from None

    def _roll_forward(self, staging: str, record: dict[str, Any] | None = None) -> None:
        """Publish a committed save from its record (idempotent; safe to repeat after a crash).

        ``record`` is the one just PUT by :meth:`commit_save`; without it (finishing a
        crashed save's commit) it is read back from the staging prefix.
        """
        resumed = record is None
        if record is None:
            record = self._read_record(staging)
        index = record["index_bytes"]
        # Without an index no tool mixes old and new files while uploads complete. A fresh
        # commit's index is new (a new snapshot id); a resumed one may find its own published.
        if not resumed or (self.exists(INDEX_NAME) and self.read_range(INDEX_NAME, 0, self.size(INDEX_NAME)) != index):
            self.retry(f"DELETE {self.path(INDEX_NAME)}", self.fs.rm_file, self.path(INDEX_NAME))

        def complete(f: str, upload: dict[str, Any]) -> None:
            bucket, key = self.bucket_key(f)
            parts = [{"PartNumber": n, "ETag": etag} for n, etag in upload["parts"]]
            try:
                self.retry(
                    f"CompleteMultipartUpload {self.path(f)}",
                    self.fs.call_s3,
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload["upload_id"],
                    MultipartUpload={"Parts": parts},
                )
            except (FileNotFoundError, StorageError):
                if not self.exists(f):  # not completed by an earlier roll-forward either
                    raise

        # S3 assembles each file on CompleteMultipartUpload (seconds for a multi-GB file).
        _each(lambda fu: complete(*fu), list(record["uploads"].items()))
        for name, data in record["small_bytes"].items():
            self.retry(f"PUT {self.path(name)}", self.fs.pipe_file, self.path(name), data)
        self._publish_index(index, record["files"])
        # The record is the staging prefix's only object.
        name = posixpath.join(staging, COMMIT_RECORD)
        self.retry(f"DELETE {self.path(name)}", self.fs.rm_file, self.path(name))
        self.fs.invalidate_cache(self.url)

    def _publish_index(self, index: bytes, files: Sequence[str]) -> None:
        """PUT the index, then delete files of older snapshots the new one does not list."""
        self.retry(f"PUT {self.path(INDEX_NAME)}", self.fs.pipe_file, self.path(INDEX_NAME), index)
        self.fs.invalidate_cache(self.url)
        for f in stale_files(self, files):
            self.retry(f"DELETE {self.path(f)}", self.fs.rm_file, self.path(f))
        self.fs.invalidate_cache(self.url)

    def abort_save(self, session: dict[str, Any]) -> None:
        """Abort every multipart upload of the session (idempotent; an unknown upload is fine)."""
        for f, upload_id in session.get("uploads", {}).items():
            bucket, key = self.bucket_key(f)
            try:
                self.retry(
                    f"AbortMultipartUpload {self.path(f)}",
                    self.fs.call_s3,
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                )
            except FileNotFoundError:
                # Every rank aborts a failed save's uploads; the first one to get there wins.
                logger.debug("upload of %s already aborted or completed", self.path(f))
            except StorageError as e:
                logger.warning("could not abort the upload of %s: %s", self.path(f), e)


def _each(fn: Callable[[T], Any], items: Sequence[T]) -> None:
    """``fn`` on every item, up to :data:`FILE_THREADS` at once; the first error is raised."""
    with ThreadPoolExecutor(max(1, min(FILE_THREADS, len(items))), thread_name_prefix="dcp-safetensors-files") as pool:
        list(pool.map(fn, items))  # consumed: re-raises the first error
