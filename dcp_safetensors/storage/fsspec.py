"""Any fsspec URL: reads with ranged requests, retries, and errors that name the request.

:class:`FsspecStorage` reads any fsspec filesystem and writes to one the
simple way: every file has one writer (``min_part`` = the whole file), written
in place with one ``pipe_file``, and the index is PUT last. Such stores cannot
stage a file, so this path has no crash safety and no pinned reads; S3 gets
both from its own class, :class:`~dcp_safetensors.storage.s3.S3Storage`.

Transient failures (throttling, 5xx, dropped connections) are retried with
exponential backoff, on top of the client's own retries; a request that
still fails raises :class:`~dcp_safetensors.errors.StorageError` naming it.
A refusal no retry can change raises at once, naming the request:
:class:`~dcp_safetensors.errors.StorageAccessError` for credentials and
permissions (wrong secret, bad signature, access denied, no credentials),
:class:`~dcp_safetensors.errors.BucketNotFoundError` for a missing bucket,
:class:`~dcp_safetensors.errors.CheckpointChangedError` for a read of a
version that was replaced (412).

Example:
    >>> FsspecStorage("memory://ckpt/step-1").min_part > 1 << 60
    True
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dcp_safetensors.commit import staging_name, stale_files
from dcp_safetensors.errors import (
    BucketNotFoundError,
    CheckpointChangedError,
    ConfigurationError,
    MissingFileError,
    StorageAccessError,
    StorageError,
    StorageFullError,
)
from dcp_safetensors.layout import PartPlan
from dcp_safetensors.names import INDEX_NAME
from dcp_safetensors.storage.base import PartTags, PartWriter, ReadHandle, SaveSession, Storage
from dcp_safetensors.storage.breaker import EndpointBreaker, reached_no_server

__all__ = ["FsspecStorage"]

logger = logging.getLogger("dcp_safetensors")

READ_BATCH = 8 << 20
"""Neighbouring small chunks of one object are read with one ranged GET of up to this many
bytes: each GET costs a round trip, and ~8 MiB ranges are what S3 serves best in parallel."""

FILE_THREADS = 16
"""Files whose multipart uploads are created, or completed, at once: a checkpoint of
dozens of files would otherwise wait dozens of round trips in a row."""

T = TypeVar("T")


class ObjectFile:
    """An object opened for reading: its size (and ETag, where the store has one), then ranged reads.

    With an ETag every read is conditional on it (``If-Match``): a replaced object
    raises CheckpointChangedError instead of serving another version's bytes.
    """

    def __init__(self, storage: FsspecStorage, name: str, etag: str | None, size: int | None = None) -> None:
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


class _PutWriter:
    """One writer per file: each part is a whole file, PUT in place."""

    def __init__(self, storage: FsspecStorage) -> None:
        self._storage = storage

    def write(self, part: PartPlan, views: Sequence[memoryview], crc32: int) -> str | None:
        s = self._storage
        data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        s.retry("PutObject", part.file, s.fs.pipe_file, s.path(part.file), data)
        return None

    def close(self) -> None:
        """Nothing to flush: a file is durable once its PUT returns."""


class FsspecStorage(Storage):
    """A checkpoint under an fsspec URL; names are relative to it.

    Args:
        url: e.g. ``"gs://bucket/prefix/step-100"``.
        storage_options: passed to the fsspec filesystem.
        max_part: unused here (one writer per file); S3's largest part.
        retries: attempts per request for transient failures.
    """

    min_part = 1 << 62
    max_part: int | None = None
    read_batch = READ_BATCH
    read_span = 64 << 20  # one GET per 64 MiB of a column shard's span: a GET costs a round trip

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        max_part: int | None = None,
        retries: int = 6,
    ) -> None:
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self.storage_options = dict(storage_options or {})
        self.retries = retries
        self._fs: Any = None
        self._breaker: EndpointBreaker | None = None
        self._warned: set[str] = set()  # kinds of retried errors logged at WARNING so far
        self._failed_write: str | None = None  # the first write that failed on every attempt (one storage: one save)

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
        state["_breaker"] = None  # a lock; and another process judges the endpoint afresh
        state["_failed_write"] = None
        return state

    @property
    def breaker(self) -> EndpointBreaker:
        """Whether this storage's endpoint answers, judged over all its requests (:mod:`.breaker`)."""
        if self._breaker is None:
            self._breaker = EndpointBreaker()
        return self._breaker

    def endpoint(self) -> str:
        """Where requests go, for an error saying it is unreachable."""
        return self.url

    def path(self, name: str) -> str:
        return posixpath.join(self.url, name) if name else self.url

    def retry(self, request: str, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, the request ``request`` (its S3 operation) on object ``name``,
        retried with exponential backoff on transient failures.

        A refusal raises at once: retrying a bad signature, a missing bucket or a full store
        cannot help, and the user should learn which request, bucket and key in seconds, not
        after the backoff. A missing object raises ``FileNotFoundError`` for the caller to judge.
        A request that reached no server is retried until the endpoint breaker judges the
        endpoint unreachable (:mod:`.breaker`), whatever ``retries`` says.
        """
        delay = 0.1
        breaker = self.breaker
        attempt = 0
        unreached: list[float] = []  # when each attempt that reached no server was sent
        while True:
            breaker.check()  # fails at once while the endpoint counts as unreachable
            sent = time.monotonic()
            try:
                result = fn(*args, **kwargs)
                breaker.answered()
                return result
            except ConfigurationError:
                raise
            except TypeError as e:
                # The client refused an argument (a storage option it does not take): no retry changes that.
                raise ConfigurationError(
                    f"{request} of {self.path(name)}: the storage client refused its arguments ({e}); check "
                    "storage_options (s3fs.S3FileSystem's: key, secret, client_kwargs={{'endpoint_url': ..., "
                    "'region_name': ...}}, config_kwargs, ...)"
                ) from e
            except Exception as e:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many types for one transient fault
                if reached_no_server(e):
                    breaker.failed(f"{request} of {self.path(name)}", self.endpoint(), e, sent)  # raises once it opens
                    unreached.append(sent)
                    # While other requests are answered the breaker stays closed: one request whose
                    # connection is dropped every time (a proxy's body limit?) must still end.
                    if len(unreached) >= self.retries and time.monotonic() - unreached[0] > 3 * breaker.window:
                        raise StorageError(
                            f"{self._where(request, name)}: reached no server on {len(unreached)} attempts over "
                            f"{time.monotonic() - unreached[0]:.0f} s while other requests were answered: {_said(e)}"
                        ) from e
                    logger.debug("%s: reached no server (%s); retrying", self._where(request, name), _said(e))
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                breaker.answered()  # an error of the server's own: it lives
                attempt += 1
                if error_code(e) in ("PreconditionFailed", "412"):
                    raise CheckpointChangedError(
                        f"{self.path(name)}: replaced by another save while this load read it (its ETag changed); "
                        "nothing mixed was loaded: load again"
                    ) from e
                if error_code(e) in ("InvalidRange", "416"):
                    raise EOFError(f"{self.path(name)}: {request} starts at or past the object's end") from e
                refused = self._refusal(request, name, e)
                if refused is not None:
                    raise refused from e
                if isinstance(e, FileNotFoundError):
                    raise
                what = self._where(request, name)
                write = request.startswith(_WRITES)
                if write and attempt < self.retries and self._failed_write is not None:
                    # One write failed on every attempt (a full store fails them all alike): the others
                    # in flight stop at their next retry instead of re-sending their bytes 6 times each.
                    raise StorageError(f"{what}: {_said(e)}; not retried, as another write of this save failed on "
                                       f"every attempt: {self._failed_write}") from e
                if attempt == self.retries:
                    if error_code(e) == "BadDigest":  # our CRC-32 of the bytes, checked by the server
                        final = StorageError(
                            f"{what}: the server received bytes whose CRC-32 is not the one computed as they were read, "
                            f"{attempt} times (BadDigest): they change in transit, or in memory while the save reads "
                            "them (a tensor updated during the save?); nothing of this save was published"
                        )
                    else:
                        final = StorageError(f"{what}: failed after {attempt} attempts: {_said(e)}{_advice(request, e)}")
                    if write:
                        self._failed_write = str(final)
                    raise final from e
                # Once per storage and kind of error at WARNING: a throttled or failing save retries
                # hundreds of requests, and a line for each would bury the one that matters.
                kind = error_code(e) or type(e).__name__
                if kind not in self._warned:
                    self._warned.add(kind)
                    logger.warning("%s: attempt %d failed (%s); retrying with backoff (further retries after %s are "
                                   "logged at DEBUG)", what, attempt, _said(e), kind)
                else:
                    logger.debug("%s: attempt %d failed (%s); retrying", what, attempt, _said(e))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _refusal(self, request: str, name: str, e: Exception) -> StorageError | None:
        """The error to raise for ``e`` if no retry can change it (credentials, a missing bucket), else None."""
        # s3fs turns the server's answer into a builtin (PermissionError, FileNotFoundError)
        # whose cause is botocore's ClientError: its code tells a missing bucket from a
        # missing key, and its operation which request inside an fsspec call was refused.
        cause = e if hasattr(e, "response") else e.__cause__
        response = getattr(cause, "response", None) or {}
        error = response.get("Error", {})
        operation = request.split()[0]
        if error.get("Code") in _FULL or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 507:
            kind: type[StorageError] = StorageFullError
            fix = ("free space on the store or raise the quota of this bucket or user, then save again; the previous "
                   "checkpoint is intact and the next save aborts this one's uploads")
        elif isinstance(e, (PermissionError, *_credential_errors())):
            kind = StorageAccessError
            fix = (
                "check the credentials (storage_options key/secret/token, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/"
                f"AWS_SESSION_TOKEN/AWS_PROFILE), that they belong to this endpoint, and that they may {operation} here"
            )
        elif isinstance(e, FileNotFoundError) and error.get("Code") == "NoSuchBucket":
            kind = BucketNotFoundError
            fix = "check the bucket name in the URL and the endpoint (storage_options client_kwargs endpoint_url, region_name)"
        else:
            return None
        where = self._where(request, name)
        if error.get("Code"):
            # The request the server refused, where an fsspec call made another (HeadObject first).
            refused = cause.operation_name  # type: ignore[union-attr]
            said = f"{error['Code']}{'' if refused == operation else f' from {refused}'}: {error.get('Message') or e}"
        else:
            said = f"{type(e).__name__}: {e}"
        return kind(f"{where}: {said.rstrip('.')}. Not retried: {fix}.")

    def _where(self, request: str, name: str) -> str:
        """The request and object an error names."""
        return f"{request} of {self.path(name)}"

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
        import fsspec.core

        # find() lists paths as the filesystem spells them without its protocol (s3: "bucket/key",
        # memory: "/path"); strip_protocol spells the URL the same way.
        root = fsspec.core.strip_protocol(self.url)
        return sorted(posixpath.relpath(f, root) for f in found)

    def read_range(self, name: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of ``name`` (``etag``: of that version; S3 only)."""
        if length == 0:
            return b""
        request = f"GetObject bytes {offset}-{offset + length - 1}"
        try:
            data = self._get(request, name, offset, length, etag)
        except FileNotFoundError:
            raise MissingFileError(f"{self.path(name)}: object is missing") from None
        if len(data) != length:
            raise EOFError(f"{self.path(name)}: object ends before byte {offset + length}")
        return data

    def _get(self, request: str, name: str, offset: int, length: int, etag: str | None) -> bytes:
        return bytes(self.retry(request, name, self.fs.cat_file, self.path(name), start=offset, end=offset + length))

    def readinto(self, name: str, offset: int, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        view[:] = self.read_range(name, offset, view.nbytes)

    def head(self, name: str, etag: str | None = None) -> tuple[int, str | None]:
        """``(size, version tag)`` of ``name``: no tag on a generic store."""
        return self.size(name), None

    def open_read(self, name: str, etag: str | None = None, size: int | None = None) -> ReadHandle:
        return ObjectFile(self, name, etag, size)

    def open_staged(self, staging: str, name: str) -> ReadHandle:
        raise MissingFileError(f"{self.path(name)}: {self.protocol}:// stages nothing")

    # -- saving: one writer per file, in place ------------------------------------------

    def recover(self, *, writer: bool) -> str | None:
        """Nothing to recover: a generic store's save is written in place."""
        return None

    def begin_save(self, snapshot: str, files: Sequence[str]) -> SaveSession:
        return SaveSession(snapshot, staging_name(snapshot))

    def part_writer(self, session: SaveSession) -> PartWriter:
        return _PutWriter(self)

    def write_small(self, session: SaveSession, name: str, data: bytes) -> None:
        self.retry("PutObject", name, self.fs.pipe_file, self.path(name), data)

    def commit_save(
        self,
        session: SaveSession,
        files: Sequence[str],
        etags: PartTags,
        index: bytes,
        checksums: Mapping[str, int],
    ) -> None:
        self.publish_index(index, files)
        session.committed = True

    def abort_save(self, session: SaveSession) -> None:
        """Nothing to undo that a store without staging could undo."""

    def publish_index(self, index: bytes, files: Sequence[str]) -> None:
        """PUT the index, then delete files of older snapshots the new one does not list."""
        self.retry("PutObject", INDEX_NAME, self.fs.pipe_file, self.path(INDEX_NAME), index)
        self.fs.invalidate_cache(self.url)
        for f in stale_files(self, files):
            self.retry("DeleteObject", f, self.fs.rm_file, self.path(f))
        self.fs.invalidate_cache(self.url)


def error_code(e: BaseException) -> str | None:
    """The S3 error code behind ``e`` (s3fs raises builtins whose cause is botocore's ClientError)."""
    cause = e if hasattr(e, "response") else e.__cause__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return str(code) if code is not None else None


_FULL = frozenset({"InsufficientStorage", "InsufficientCapacity", "XMinioStorageFull", "QuotaExceeded",
                   "XMinioAdminBucketQuotaExceeded"})
"""Error codes of stores that are out of space or over a quota (AWS, Ceph RGW, MinIO): no retry frees space."""

_WRITES = ("UploadPart", "PutObject", "CompleteMultipartUpload", "CreateMultipartUpload")


def _advice(request: str, e: BaseException) -> str:
    """What to do about a request that failed on every attempt, where its error code says."""
    code = error_code(e)
    if code in ("SlowDown", "503", "ServiceUnavailable"):
        return ("; the server kept asking to slow down: fewer write_threads/read_threads, or a higher request rate "
                "for this prefix from the store's operator")
    if code in ("InternalError", "500") and request.startswith(_WRITES):
        # SeaweedFS answers every write so once its disks are full (measured), as may others.
        return ("; a server that fails every write so may be out of disk space (SeaweedFS answers a full disk with "
                "500 InternalError): check the store's free space. The previous checkpoint is intact")
    return ""


def _said(e: BaseException) -> str:
    """What the server answered (its error code first: s3fs's builtins hide it), or the exception."""
    code = error_code(e)
    return f"{code}: {e}" if code else f"{type(e).__name__}: {e}"


@functools.cache
def _credential_errors() -> tuple[type[Exception], ...]:
    """botocore's errors for credentials it could not find (not a server's answer, so s3fs passes them on)."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # another fsspec backend: it reports credentials as PermissionError
        return ()
    return (NoCredentialsError, PartialCredentialsError)


def each(fn: Callable[[T], Any], items: Sequence[T]) -> None:
    """``fn`` on every item, up to :data:`FILE_THREADS` at once; the first error is raised."""
    with ThreadPoolExecutor(max(1, min(FILE_THREADS, len(items))), thread_name_prefix="dcp-safetensors-files") as pool:
        list(pool.map(fn, items))  # consumed: re-raises the first error
