"""Object stores through fsspec: S3 multipart uploads written by the ranks that hold the bytes.

On S3 (``s3://``, via ``s3fs``) a save is one multipart upload per file,
created by the coordinator; each rank uploads the parts the layout gave it
(``UploadPart``, every part but the last >= 5 MiB), and the coordinator
completes the uploads from the part ETags and then PUTs the index: the index
is the commit point, and an object appears only when its upload completes. On
any failure every open upload is aborted and no index is written. Any other
fsspec URL takes the generic path: one writer per file (``min_part`` = the
whole file), written with one ``pipe_file``.

Transient failures (throttling, 5xx, dropped connections) are retried with
exponential backoff, on top of the client's own retries; a request that
still fails raises :class:`~dcp_safetensors.errors.StorageError` naming it.

Example:
    >>> ObjectStorage("s3://bucket/run/step-1", {"anon": True}).min_part
    5242880
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dcp_safetensors.errors import ConfigurationError, MissingFileError, StorageError
from dcp_safetensors.layout import PartPlan

__all__ = ["ObjectStorage", "S3_MIN_PART"]

logger = logging.getLogger("dcp_safetensors")

S3_MIN_PART = 5 << 20
"""S3 rejects a non-last multipart part smaller than this (``EntityTooSmall``)."""

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
        """Forget cached listings; writers also abort uploads an interrupted save left open here."""
        self.fs.invalidate_cache()
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
        session: dict[str, Any] = {"snapshot": snapshot, "uploads": {}}
        if not self.multipart:
            return session
        try:
            for f in files:
                bucket, key = self.bucket_key(f)
                response = self.retry(
                    f"CreateMultipartUpload {self.path(f)}",
                    self.fs.call_s3,
                    "create_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                )
                session["uploads"][f] = response["UploadId"]
        except BaseException:
            self.abort_save(session)
            raise
        return session

    def part_writer(self, session: dict[str, Any]) -> _ObjectPartWriter:
        return _ObjectPartWriter(self, session)

    def write_small(self, session: dict[str, Any], name: str, data: bytes) -> None:
        self.retry(f"PUT {self.path(name)}", self.fs.pipe_file, self.path(name), data)

    def commit_save(
        self, session: dict[str, Any], files: Sequence[str], tokens: dict[str, list[tuple[int, str]]], index: bytes
    ) -> None:
        """Complete every upload, then PUT the index (the commit point), then drop stale files."""
        from dcp_safetensors.commit import INDEX_NAME, is_owned_file

        try:
            old = [f for f in self.listdir() if is_owned_file(f)]
            # Without an index no tool mixes old and new files while uploads complete.
            if INDEX_NAME in old:
                self.retry(f"DELETE {self.path(INDEX_NAME)}", self.fs.rm_file, self.path(INDEX_NAME))
            for f, upload_id in session["uploads"].items():
                bucket, key = self.bucket_key(f)
                parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(tokens[f])]
                self.retry(
                    f"CompleteMultipartUpload {self.path(f)}",
                    self.fs.call_s3,
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self.abort_save(session)
            raise
        self.retry(f"PUT {self.path(INDEX_NAME)}", self.fs.pipe_file, self.path(INDEX_NAME), index)
        for f in old:
            if f not in files and f != INDEX_NAME:
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
            except (StorageError, FileNotFoundError) as e:
                logger.warning("could not abort the upload of %s: %s", self.path(f), e)
