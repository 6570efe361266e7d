"""Storage backends: where a checkpoint's bytes live, behind one contract (:class:`Storage`).

* :class:`~dcp_safetensors.storage.local.LocalStorage`: local and shared POSIX
  filesystems (NVMe, Lustre, GPFS, NFS): ``pwrite``/``pread``, staged commit
  with renames (:class:`~dcp_safetensors.storage.rename_commit.RenameCommit`).
* :class:`~dcp_safetensors.storage.s3.S3Storage`: ``s3://``, multipart uploads
  by the ranks holding the bytes, committed by one record
  (:class:`~dcp_safetensors.storage.record_commit.RecordCommit`).
* :class:`~dcp_safetensors.storage.fsspec.FsspecStorage`: any other fsspec
  URL, one writer per file, written in place.

Example:
    >>> [type(open_storage(p)).__name__ for p in ("/tmp/ckpt", "s3://b/p", "memory://p")]
    ['LocalStorage', 'S3Storage', 'FsspecStorage']
"""

from __future__ import annotations

import os
from typing import Any

from dcp_safetensors.storage.base import SaveSession, Storage
from dcp_safetensors.storage.fsspec import FsspecStorage
from dcp_safetensors.storage.local import LocalStorage
from dcp_safetensors.storage.s3 import S3Storage

__all__ = ["Storage", "SaveSession", "LocalStorage", "S3Storage", "FsspecStorage", "open_storage", "is_url"]


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an fsspec URL rather than a local path (``file://`` counts as local)."""
    p = os.fspath(path)
    return "://" in p and not p.startswith("file://")


def open_storage(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Storage:
    """The backend for ``path``: ``s3://`` gets :class:`S3Storage`, another URL :class:`FsspecStorage`,
    anything else :class:`LocalStorage`."""
    p = os.fspath(path)
    if not is_url(p):
        return LocalStorage(p.removeprefix("file://"), **kwargs)
    if p.split("://", 1)[0] in ("s3", "s3a"):
        return S3Storage(p, storage_options, **kwargs)
    return FsspecStorage(p, storage_options, **kwargs)
