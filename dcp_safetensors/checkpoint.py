"""A checkpoint directory as a reader sees it: index, headers, tensors, objects.

:func:`read_checkpoint` opens any HF safetensors checkpoint (ours, any
``save_pretrained`` / ``huggingface_hub`` output, single file or indexed) and
checks everything that can be checked without reading tensor data: the index
is well-formed and names no path outside the directory, every listed file
exists with the recorded size, every header obeys the format, every key the
index lists is in its file, and every file belongs to the index's snapshot.
:func:`verify` adds every file's checksum. :func:`build_index` writes the index
that a save commits.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
    >>> ckpt = read_checkpoint(d)
    >>> ckpt.tensors["w"].shape, ckpt.written_by_us
    ((2,), False)
"""

from __future__ import annotations

import json
import logging
import posixpath
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dcp_safetensors.checksum import format_crc32
from dcp_safetensors.commit import INDEX_NAME, TRAINING_STATE_DIR
from dcp_safetensors.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    FileSizeMismatchError,
    InvalidIndexError,
    MissingKeyError,
    SnapshotMismatchError,
    UnsafePathError,
)
from dcp_safetensors.format import DTYPE_ITEMSIZE, Header, header_length, parse_header
from dcp_safetensors.layout import natural_key
from dcp_safetensors.objects import decode_object
from dcp_safetensors.storage import Storage, open_storage

__all__ = [
    "FORMAT_VERSION",
    "SNAPSHOT_KEY",
    "SINGLE_FILE",
    "OBJECTS_FILE",
    "TensorLocation",
    "Checkpoint",
    "build_index",
    "read_checkpoint",
    "verify",
]

logger = logging.getLogger("dcp_safetensors")

FORMAT_VERSION = 1
SNAPSHOT_KEY = "dcp_safetensors_snapshot"
"""``__metadata__`` key holding the snapshot id in every file we write."""
BLOCK_KEY = "dcp_safetensors"
"""Our block inside the index's ``metadata``."""
SINGLE_FILE = "model.safetensors"
OBJECTS_FILE = posixpath.join(TRAINING_STATE_DIR, "objects.json")


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: ``file``, absolute byte ``offset``, dtype name and shape."""

    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """A validated checkpoint: tensors by DCP key, non-tensor values, files and their headers."""

    root: str
    tensors: dict[str, TensorLocation]
    objects: dict[str, Any]
    headers: dict[str, Header]
    snapshot: str | None
    written_by_us: bool
    checksums: dict[str, str] = field(default_factory=dict)
    model_prefix: str | None = None


def build_index(
    *,
    snapshot: str,
    weight_map: Mapping[str, str],
    total_size: int,
    files: Mapping[str, tuple[int, str]],
    extra_weight_map: Mapping[str, str],
    objects_file: str | None,
    model_prefix: str | None,
) -> bytes:
    """The bytes of ``model.safetensors.index.json`` for a save.

    ``files`` maps each file to ``(size, checksum)``. HF tools read
    ``metadata.total_size`` and ``weight_map``; the rest lives under
    ``metadata.dcp_safetensors``.

    Example:
        >>> idx = json.loads(build_index(snapshot="s", weight_map={"w": "model.safetensors"},
        ...     total_size=8, files={"model.safetensors": (96, "crc32:00000000")},
        ...     extra_weight_map={}, objects_file=None, model_prefix=None))
        >>> idx["weight_map"], idx["metadata"]["total_size"]
        ({'w': 'model.safetensors'}, 8)
    """
    block = {
        "format_version": FORMAT_VERSION,
        "snapshot": snapshot,
        "model_prefix": model_prefix,
        "files": {f: {"size": size, "checksum": crc} for f, (size, crc) in sorted(files.items())},
        "extra_weight_map": {k: extra_weight_map[k] for k in sorted(extra_weight_map, key=natural_key)},
        "objects": objects_file,
    }
    index = {
        "metadata": {"total_size": total_size, BLOCK_KEY: block},
        "weight_map": {k: weight_map[k] for k in sorted(weight_map, key=natural_key)},
    }
    return (json.dumps(index, indent=2) + "\n").encode()


def _safe_name(name: object, root: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or posixpath.normpath(name) != name
        or name.split("/")[0] == ".."
    ):
        raise UnsafePathError(
            f"{posixpath.join(root, INDEX_NAME)}: file name {str(name)[:200]!r} points outside the checkpoint directory"
        )
    return name


def _describe_directory(storage: Storage) -> str:
    entries = storage.listdir()
    if not entries:
        return f"{storage.path('')}: no checkpoint here (the directory is empty or missing)"
    if ".metadata" in entries or any(e.endswith(".distcp") for e in entries):
        return (
            f"{storage.path('')}: holds a torch.distributed.checkpoint (.distcp) checkpoint, not safetensors; "
            f"convert it with `dcp-safetensors convert {storage.path('')} DST` or load it with FileSystemReader"
        )
    if any(e.endswith(".bin") or e.endswith(".pt") for e in entries):
        return (
            f"{storage.path('')}: holds pickled weights ({', '.join(e for e in entries if e.endswith(('.bin', '.pt')))}) "
            "but no safetensors; convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    return f"{storage.path('')}: no {INDEX_NAME} or {SINGLE_FILE}; found {', '.join(entries[:10])}"


def _read_json(storage: Storage, name: str) -> Any:
    raw = storage.read_range(name, 0, storage.size(name))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidIndexError(f"{storage.path(name)}: not valid JSON ({str(e)[:200]})") from None


def read_header(storage: Storage, name: str) -> Header:
    """Read and validate one file's header: two small reads, length checked before the second."""
    size = storage.size(name)
    source = storage.path(name)
    prefix = storage.read_range(name, 0, min(size, 8))
    n = header_length(prefix, size, source=source)
    return parse_header(prefix + storage.read_range(name, 8, n), size, source=source)


def read_checkpoint(
    path: str, *, model_prefix: str | None = None, storage_options: dict[str, Any] | None = None
) -> Checkpoint:
    """Open and validate the checkpoint at ``path``, a directory or an fsspec URL (see the module docstring).

    ``model_prefix`` is prepended (with a dot) to every weight-map key to form
    the DCP key; by default it is the prefix the save recorded, or none.
    """
    storage = open_storage(path, storage_options)
    storage.recover(discard_uncommitted=False)
    block: dict[str, Any] = {}
    if storage.exists(INDEX_NAME):
        index = _read_json(storage, INDEX_NAME)
        source = storage.path(INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise InvalidIndexError(f"{source}: no 'weight_map' object")
        weight_map = index["weight_map"]
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise InvalidIndexError(f"{source}: 'metadata' is not an object")
        block = meta.get(BLOCK_KEY) or {}
        if not isinstance(block, dict):
            raise InvalidIndexError(f"{source}: 'metadata.{BLOCK_KEY}' is not an object")
    elif storage.exists(SINGLE_FILE):
        weight_map = {name: SINGLE_FILE for name in read_header(storage, SINGLE_FILE).tensors}
    else:
        raise CheckpointNotFoundError(_describe_directory(storage))

    ours = bool(block)
    snapshot = block.get("snapshot") if ours else None
    if model_prefix is None:
        model_prefix = block.get("model_prefix")
    extra = block.get("extra_weight_map") or {}
    recorded = block.get("files") or {}
    if not all(isinstance(m, dict) for m in (extra, recorded)):
        raise InvalidIndexError(f"{storage.path(INDEX_NAME)}: malformed '{BLOCK_KEY}' block")

    keyed: dict[str, tuple[str, str]] = {}
    for name, file in weight_map.items():
        keyed[f"{model_prefix}.{name}" if model_prefix else name] = (name, _safe_name(file, path))
    for key, file in extra.items():
        keyed[key] = (key, _safe_name(file, path))

    headers: dict[str, Header] = {}
    checksums: dict[str, str] = {}
    for file in sorted({f for _, f in keyed.values()} | set(map(lambda f: _safe_name(f, path), recorded))):
        size = storage.size(file)
        if file in recorded:
            want = recorded[file].get("size") if isinstance(recorded[file], dict) else None
            if want != size:
                raise FileSizeMismatchError(
                    f"{storage.path(file)}: {size} bytes on storage, the index recorded {want} (truncated or replaced)"
                )
            checksums[file] = recorded[file].get("checksum")
        header = read_header(storage, file)
        if ours:
            found = (header.metadata or {}).get(SNAPSHOT_KEY)
            if found != snapshot:
                raise SnapshotMismatchError(
                    f"{storage.path(file)}: belongs to save {found!r}, the index to save {snapshot!r} "
                    "(a stale or foreign file; re-save or restore the matching file)"
                )
        headers[file] = header

    tensors: dict[str, TensorLocation] = {}
    for key, (name, file) in keyed.items():
        entry = headers[file].tensors.get(name)
        if entry is None:
            raise MissingKeyError(f"{storage.path(file)}: tensor {name!r} listed in the index is not in this file")
        tensors[key] = TensorLocation(file, headers[file].data_start + entry.begin, entry.dtype, entry.shape)

    objects: dict[str, Any] = {}
    objects_file = block.get("objects")
    if objects_file:
        objects_file = _safe_name(objects_file, path)
        records = _read_json(storage, objects_file)
        if not isinstance(records, dict):
            raise CheckpointCorruptError(f"{storage.path(objects_file)}: not a JSON object")
        objects = {k: decode_object(v, key=k, source=storage.path(objects_file)) for k, v in records.items()}
    return Checkpoint(path, tensors, objects, headers, snapshot, ours, checksums, model_prefix)


def verify(path: str, *, chunk_size: int = 16 << 20, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Every check :func:`read_checkpoint` makes, plus every file's checksum (reads every byte).

    Raises a :class:`~dcp_safetensors.errors.CheckpointCorruptError` subclass
    naming the first broken file; returns the checkpoint if intact. Checkpoints
    written by other tools carry no checksums: their structure is checked.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
        >>> sorted(verify(d).headers)
        ['model.safetensors']
    """
    ckpt = read_checkpoint(path, storage_options=storage_options)
    storage = open_storage(path, storage_options)
    for file, want in sorted(ckpt.checksums.items()):
        size = storage.size(file)
        crc = 0
        buf = bytearray(min(chunk_size, size))
        for offset in range(0, size, chunk_size):
            view = memoryview(buf)[: min(chunk_size, size - offset)]
            storage.readinto(file, offset, view)
            crc = zlib.crc32(view, crc)
        if format_crc32(crc) != want:
            raise ChecksumMismatchError(
                f"{storage.path(file)}: checksum {format_crc32(crc)} differs from {want} recorded at save time "
                "(the file's bytes changed after it was written)"
            )
    return ckpt
