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
A refusal no retry can change raises at once, naming the request, bucket and
key: :class:`~dcp_safetensors.errors.StorageAccessError` for credentials and
permissions (wrong secret, bad signature, access denied, no credentials),
:class:`~dcp_safetensors.errors.BucketNotFoundError` for a missing bucket.

Example:
    >>> ObjectStorage("s3://bucket/run/step-1", {"anon": True}).min_part
    5242880
"""

from __future__ import annotations

import base64
import email.utils
import functools
import json
import logging
import math
import os
import posixpath
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dcp_safetensors.commit import staging_name, stale_files
from dcp_safetensors.errors import (
    BucketNotFoundError,
    CheckpointChangedError,
    CheckpointCorruptError,
    ConcurrentSaveError,
    ConfigurationError,
    MissingFileError,
    StorageAccessError,
    StorageError,
)
from dcp_safetensors.layout import PartPlan
from dcp_safetensors.names import COMMIT_RECORD, INDEX_NAME, STAGING_PREFIX

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

PUBLISH_LEASE = 20.0
"""Seconds after its commit record's PUT during which a reader leaves a save's publish to its
writer (an object store cannot tell whether that process lives); after it, a reader takes over."""

T = TypeVar("T")


class _ObjectFile:
    """An object opened for reading: size and ETag from one HEAD, then ranged GETs ``If-Match`` that ETag."""

    def __init__(self, storage: ObjectStorage, name: str, etag: str | None, size: int | None = None) -> None:
        self._storage = storage
        self.name = name
        self.path = storage.path(name)
        self.etag: str | None
        if etag is not None and size is not None:
            self.size, self.etag = size, etag  # known: the first GET, If-Match, checks it
        else:
            self.size, self.etag = storage.head(name, etag)

    def readinto(self, offset: int, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        if view.nbytes:
            view[:] = self._storage.read_range(self.name, offset, view.nbytes, etag=self.etag)

    def close(self) -> None:
        """Nothing to release: each read is its own request."""


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


class _ObjectPartWriter:
    def __init__(self, storage: ObjectStorage, session: dict[str, Any]) -> None:
        self._storage = storage
        self._uploads: dict[str, str] = session.get("uploads", {})

    def write(self, part: PartPlan, views: Sequence[memoryview]) -> str | None:
        data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        s = self._storage
        if not s.multipart:
            s.retry("PutObject", part.file, s.fs.pipe_file, s.path(part.file), data)
            return None
        bucket, key = s.bucket_key(part.file)
        try:
            response = s.retry(
                f"UploadPart {part.number}",
                part.file,
                s.fs.call_s3,
                "upload_part",
                Bucket=bucket,
                Key=key,
                PartNumber=part.number,
                UploadId=self._uploads[part.file],
                Body=data,
            )
        except FileNotFoundError as e:
            if _error_code(e) != "NoSuchUpload":
                raise
            raise ConcurrentSaveError(
                f"{s.path(part.file)}: the multipart upload of this save was aborted by someone else: another save "
                "to this checkpoint (a restarted job?) began and cleaned up uploads it took for abandoned. This save "
                "stopped; nothing of it was published"
            ) from None
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

    def retry(self, request: str, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, the request ``request`` (its S3 operation) on object ``name``,
        retried with exponential backoff on transient failures.

        A refusal raises at once: retrying a bad signature or a missing bucket cannot help, and
        the user should learn which request, bucket and key in seconds, not after the backoff.
        A missing object raises ``FileNotFoundError`` for the caller to judge.
        """
        delay = 0.1
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except ConfigurationError:
                raise
            except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types for one transient fault
                if _error_code(e) in ("PreconditionFailed", "412"):
                    raise CheckpointChangedError(
                        f"{self.path(name)}: replaced by another save while this load read it (its ETag changed); "
                        "nothing mixed was loaded: load again"
                    ) from e
                refused = self._refusal(request, name, e)
                if refused is not None:
                    raise refused from e
                if isinstance(e, FileNotFoundError):
                    raise
                what = f"{request} of {self.path(name)}"
                if attempt == self.retries:
                    raise StorageError(f"{what}: failed after {attempt} attempts: {type(e).__name__}: {e}") from e
                logger.warning("%s: attempt %d failed (%s: %s); retrying", what, attempt, type(e).__name__, e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _refusal(self, request: str, name: str, e: Exception) -> StorageError | None:
        """The error to raise for ``e`` if no retry can change it (credentials, a missing bucket), else None."""
        # s3fs turns the server's answer into a builtin (PermissionError, FileNotFoundError)
        # whose cause is botocore's ClientError: its code tells a missing bucket from a
        # missing key, and its operation which request inside an fsspec call was refused.
        cause = e if hasattr(e, "response") else e.__cause__
        error = (getattr(cause, "response", None) or {}).get("Error", {})
        operation = request.split()[0]
        if isinstance(e, (PermissionError, *_credential_errors())):
            kind: type[StorageError] = StorageAccessError
            fix = (
                "check the credentials (storage_options key/secret/token, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/"
                f"AWS_SESSION_TOKEN/AWS_PROFILE), that they belong to this endpoint, and that they may {operation} here"
            )
        elif isinstance(e, FileNotFoundError) and error.get("Code") == "NoSuchBucket":
            kind = BucketNotFoundError
            fix = "check the bucket name in the URL and the endpoint (storage_options client_kwargs endpoint_url, region_name)"
        else:
            return None
        where = f"{request} of {self.path(name)}"
        if self.multipart:
            bucket, key = self.bucket_key(name)
            where += f" (bucket {bucket!r}, key {key!r}) at {self.fs.s3.meta.endpoint_url}"
        if error.get("Code"):
            # The request the server refused, where an fsspec call made another (HeadObject first).
            refused = cause.operation_name  # type: ignore[union-attr]
            said = f"{error['Code']}{'' if refused == operation else f' from {refused}'}: {error.get('Message') or e}"
        else:
            said = f"{type(e).__name__}: {e}"
        return kind(f"{where}: {said.rstrip('.')}. Not retried: {fix}.")

    # -- reading ------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return bool(self.retry("HeadObject", name, self.fs.exists, self.path(name)))

    def size(self, name: str) -> int:
        try:
            return int(self.retry("HeadObject", name, self.fs.size, self.path(name)))
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None

    def listdir(self, name: str = "") -> list[str]:
        try:
            entries = self.retry("ListObjectsV2", name, self.fs.ls, self.path(name), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def walk_files(self, name: str) -> list[str]:
        """Names (relative to the checkpoint) of every object under ``name``."""
        try:
            found = self.retry("ListObjectsV2", name, self.fs.find, self.path(name))
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.url)
        return sorted(posixpath.relpath(self.fs._strip_protocol(f), root) for f in found)

    def read_range(self, name: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of ``name``; with ``etag``, of that version only."""
        if length == 0:
            return b""
        request = f"GetObject bytes {offset}-{offset + length - 1}"
        try:
            if etag is not None and self.multipart:
                data = self.retry(request, name, self._get_if_match, name, offset, length, etag)
            else:
                data = self.retry(request, name, self.fs.cat_file, self.path(name), start=offset, end=offset + length)
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None
        if len(data) != length:
            raise EOFError(f"{self.path(name)}: object ends before byte {offset + length}")
        return data

    def _get_if_match(self, name: str, offset: int, length: int, etag: str) -> bytes:
        import fsspec.asyn

        bucket, key = self.bucket_key(name)

        async def get() -> bytes:
            response = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}", IfMatch=etag
            )
            try:
                return bytes(await response["Body"].read())
            finally:
                response["Body"].close()

        return bytes(fsspec.asyn.sync(self.fs.loop, get))

    def head(self, name: str, etag: str | None = None) -> tuple[int, str | None]:
        """``(size, ETag)`` of ``name``; with ``etag``, CheckpointChangedError if it is another version."""
        try:
            if not self.multipart:
                return self.size(name), None
            bucket, key = self.bucket_key(name)
            condition = {"IfMatch": etag} if etag is not None else {}
            response = self.retry("HeadObject", name, self.fs.call_s3, "head_object", Bucket=bucket, Key=key, **condition)
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None
        return int(response["ContentLength"]), response["ETag"]

    def readinto(self, name: str, offset: int, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        view[:] = self.read_range(name, offset, view.nbytes)

    def open_read(self, name: str, etag: str | None = None, size: int | None = None) -> _ObjectFile:
        """Open ``name`` for reads that all see one version of it (``etag``: that version, else the
        current; with its ``size`` too, no request is made until the first read)."""
        return _ObjectFile(self, name, etag, size)

    def open_staged(self, staging: str, name: str) -> _StagedBytes:
        """The copy of ``name`` that the committed save ``staging`` holds in its record, before publishing it.

        Only the index and the small files live there; a data file is an upload completed into its
        final key (MissingFileError here: read it there).
        """
        record = self._read_record(staging)
        data = record["index_bytes"] if name == INDEX_NAME else record["small_bytes"].get(name)
        if data is None:
            raise MissingFileError(f"{self.path(name)}: not in the commit record of {staging}")
        return _StagedBytes(self.path(posixpath.join(staging, name)), data)

    def recover(self, *, writer: bool) -> str | None:
        """Finish commits a crash interrupted; writers also abort uploads an uncommitted save left open.

        An object store cannot tell whether a writer lives: readers leave a commit younger than
        :data:`PUBLISH_LEASE` to its writer and return its staging prefix (they read the new
        snapshot through its record); writers, and readers after the lease, roll it forward.
        """
        self.fs.invalidate_cache()
        publishing = None
        for entry in self.listdir():
            if not entry.startswith(STAGING_PREFIX):
                continue
            age = self._age(posixpath.join(entry, COMMIT_RECORD))
            if age is None:
                continue
            if writer or age > PUBLISH_LEASE or self._writer_died(entry):
                logger.warning("completing the commit of %s left by an interrupted save", entry)
                self._roll_forward(entry)
            else:
                publishing = entry
        if not (writer and self.multipart):
            return publishing
        bucket, prefix = self.bucket_key("")
        uploads: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:  # a page lists at most 1,000 uploads on S3
            page = self.retry(
                "ListMultipartUploads", "", self.fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/", **markers
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
        _each(lambda u: self._abort(u["Key"][len(prefix) + 1 :], u["UploadId"]), uploads)
        return publishing

    def _writer_died(self, staging: str) -> bool:
        """Whether the process that committed ``staging`` is known dead: it ran on this host and is gone."""
        try:
            owner = self._read_record(staging).get("writer") or {}
        except (CheckpointCorruptError, MissingFileError, FileNotFoundError):
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
        if not self.multipart:
            return math.inf if self.exists(name) else None
        bucket, key = self.bucket_key(name)
        try:
            response = self.retry("HeadObject", name, self.fs.call_s3, "head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        now = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if now is None:
            return math.inf
        return (email.utils.parsedate_to_datetime(now) - response["LastModified"]).total_seconds()

    def _abort(self, name: str, upload_id: str) -> None:
        """Abort one multipart upload; one already aborted or completed is fine."""
        bucket, key = self.bucket_key(name)
        try:
            self.retry(
                "AbortMultipartUpload",
                name,
                self.fs.call_s3,
                "abort_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
            )
        except FileNotFoundError:
            # Every rank aborts a failed save's uploads; the first one to get there wins.
            logger.debug("upload of %s already aborted or completed", self.path(name))

    # -- saving -------------------------------------------------------------------------

    def begin_save(self, snapshot: str, files: Sequence[str]) -> dict[str, Any]:
        self.recover(writer=True)
        session: dict[str, Any] = {"snapshot": snapshot, "uploads": {}, "small": {}}
        if not self.multipart:
            return session

        def create(f: str) -> None:
            bucket, key = self.bucket_key(f)
            response = self.retry("CreateMultipartUpload", f, self.fs.call_s3, "create_multipart_upload", Bucket=bucket, Key=key)
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
            self.retry("PutObject", name, self.fs.pipe_file, self.path(name), data)

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
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            "files": list(files),
            "uploads": {f: {"upload_id": u, "parts": sorted(tokens.get(f, []))} for f, u in session["uploads"].items()},
            "small": {name: base64.b64encode(data).decode() for name, data in session["small"].items()},
            "index": base64.b64encode(index).decode(),
        }
        try:
            name = posixpath.join(staging, COMMIT_RECORD)
            self.retry("PutObject", name, self.fs.pipe_file, self.path(name), json.dumps(record).encode())
        except BaseException:
            self.abort_save(session)
            raise
        # Past the commit point the uploads belong to the record: a failure while rolling
        # forward leaves them for the next reader or writer to complete, never to abort.
        session["committed"] = True
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
            self.retry("DeleteObject", INDEX_NAME, self.fs.rm_file, self.path(INDEX_NAME))

        def complete(f: str, upload: dict[str, Any]) -> None:
            bucket, key = self.bucket_key(f)
            parts = [{"PartNumber": n, "ETag": etag} for n, etag in upload["parts"]]
            try:
                self.retry(
                    "CompleteMultipartUpload",
                    f,
                    self.fs.call_s3,
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload["upload_id"],
                    MultipartUpload={"Parts": parts},
                )
            except (StorageAccessError, BucketNotFoundError):
                raise  # asking whether it completed would be refused too
            except (FileNotFoundError, StorageError):
                if not self.exists(f):  # not completed by an earlier roll-forward either
                    raise

        # S3 assembles each file on CompleteMultipartUpload (seconds for a multi-GB file).
        _each(lambda fu: complete(*fu), list(record["uploads"].items()))
        for name, data in record["small_bytes"].items():
            self.retry("PutObject", name, self.fs.pipe_file, self.path(name), data)
        self._publish_index(index, record["files"])
        # The record is the staging prefix's only object.
        name = posixpath.join(staging, COMMIT_RECORD)
        self.retry("DeleteObject", name, self.fs.rm_file, self.path(name))
        self.fs.invalidate_cache(self.url)

    def _publish_index(self, index: bytes, files: Sequence[str]) -> None:
        """PUT the index, then delete files of older snapshots the new one does not list."""
        self.retry("PutObject", INDEX_NAME, self.fs.pipe_file, self.path(INDEX_NAME), index)
        self.fs.invalidate_cache(self.url)
        for f in stale_files(self, files):
            self.retry("DeleteObject", f, self.fs.rm_file, self.path(f))
        self.fs.invalidate_cache(self.url)

    def abort_save(self, session: dict[str, Any]) -> None:
        """Abort every multipart upload of an uncommitted session (idempotent; an unknown upload is fine)."""
        if session.get("committed"):
            return
        for f, upload_id in session.get("uploads", {}).items():
            try:
                self._abort(f, upload_id)
            except StorageError as e:  # the save's own error is the one to raise
                logger.warning("could not abort an upload: %s", e)


def _error_code(e: BaseException) -> str | None:
    """The S3 error code behind ``e`` (s3fs raises builtins whose cause is botocore's ClientError)."""
    cause = e if hasattr(e, "response") else e.__cause__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return str(code) if code is not None else None


@functools.cache
def _credential_errors() -> tuple[type[Exception], ...]:
    """botocore's errors for credentials it could not find (not a server's answer, so s3fs passes them on)."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # another fsspec backend: it reports credentials as PermissionError
        return ()
    return (NoCredentialsError, PartialCredentialsError)


def _each(fn: Callable[[T], Any], items: Sequence[T]) -> None:
    """``fn`` on every item, up to :data:`FILE_THREADS` at once; the first error is raised."""
    with ThreadPoolExecutor(max(1, min(FILE_THREADS, len(items))), thread_name_prefix="dcp-safetensors-files") as pool:
        list(pool.map(fn, items))  # consumed: re-raises the first error
