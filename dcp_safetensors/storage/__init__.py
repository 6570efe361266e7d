"""Storage backends: where a checkpoint's bytes live.

* :class:`~dcp_safetensors.storage.local.LocalStorage`: local and shared POSIX
  filesystems (NVMe, Lustre, GPFS, NFS): ``pwrite``/``pread``, staged commit.
* :class:`~dcp_safetensors.storage.fsspec.ObjectStorage`: ``s3://`` (multipart
  uploads by the ranks holding the bytes) and any other fsspec URL.

Both expose the same save protocol to the writer (``min_part``/``max_part``,
``begin_save``, ``part_writer``, ``write_small``, ``commit_save``,
``abort_save``) and the same reads to the reader.

Example:
    >>> type(open_storage("/tmp/ckpt")).__name__, type(open_storage("s3://b/p")).__name__
    ('LocalStorage', 'ObjectStorage')
"""

from __future__ import annotations

import os
from typing import Any

from dcp_safetensors.storage.fsspec import ObjectStorage
from dcp_safetensors.storage.local import LocalStorage

__all__ = ["LocalStorage", "ObjectStorage", "Storage", "open_storage", "is_url"]

Storage = LocalStorage | ObjectStorage


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an fsspec URL rather than a local path (``file://`` counts as local)."""
    p = os.fspath(path)
    return "://" in p and not p.startswith("file://")


def open_storage(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Storage:
    """The backend for ``path``: an fsspec URL gets :class:`ObjectStorage`, anything else :class:`LocalStorage`."""
    p = os.fspath(path)
    if is_url(p):
        return ObjectStorage(p, storage_options, **kwargs)
    return LocalStorage(p.removeprefix("file://"), **kwargs)
