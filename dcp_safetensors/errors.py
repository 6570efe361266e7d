"""Exception types raised by dcp_safetensors.

Every error carries one message string as its only constructor argument, so it
pickles: DCP ships a failing rank's exception to every other rank by pickling
it inside :class:`torch.distributed.checkpoint.api.CheckpointException`, and a
user catching ``exc.failures[rank][0]`` gets our type back, not a string.

Example:
    >>> from dcp_safetensors.errors import HeaderTooLargeError, CheckpointCorruptError
    >>> issubclass(HeaderTooLargeError, CheckpointCorruptError)
    True
    >>> import pickle
    >>> type(pickle.loads(pickle.dumps(HeaderTooLargeError("x")))).__name__
    'HeaderTooLargeError'
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol


class DcpSafetensorsError(Exception):
    """Base class of every error this package raises."""


class ConfigurationError(DcpSafetensorsError, ValueError):
    """An option or a call that this package cannot honour (e.g. a bad ``max_shard_size``)."""


class LayoutError(DcpSafetensorsError):
    """The ranks' plans do not describe one consistent checkpoint (overlap, hole, dtype clash)."""


class RankFailedError(DcpSafetensorsError):
    """Another rank failed; raised on every rank so none waits in a collective for it."""


class StorageError(DcpSafetensorsError):
    """A storage request failed for good (after retries); the message names the object and request."""


class StorageAccessError(StorageError):
    """The object store refused the credentials (wrong key or secret, bad signature, expired token, none found) or the permission for a request; not retried."""


class BucketNotFoundError(StorageError):
    """The bucket named in the URL does not exist at the storage endpoint; not retried."""


class StorageFullError(StorageError):
    """The object store is out of space or over a quota (507, ``XMinioStorageFull``, ``QuotaExceeded``, ...); not retried."""


class ConcurrentSaveError(StorageError):
    """Another live save is writing to the same checkpoint directory; this one stops before touching it."""


class CheckpointChangedError(DcpSafetensorsError):
    """A save replaced the checkpoint while this load read it: nothing mixed was returned; load again."""


class CheckpointNotFoundError(DcpSafetensorsError, FileNotFoundError):
    """No safetensors checkpoint at the path; the message says what was found instead."""


class CheckpointMismatchError(DcpSafetensorsError):
    """A valid checkpoint that lacks what the target needs: a missing key, or a tensor of another shape."""


class ConversionError(DcpSafetensorsError):
    """A source that ``convert`` will not carry over (the message says what and where)."""


class CheckpointCorruptError(DcpSafetensorsError):
    """A checkpoint on storage breaks a rule of the safetensors format or of our index."""


# --- safetensors header rules: one type per rule (mirrors safetensors' Rust errors) ---


class HeaderError(CheckpointCorruptError):
    """A safetensors file header breaks one of the format's rules."""


class HeaderTooSmallError(HeaderError):
    """The file is shorter than the 8-byte header length prefix."""


class HeaderTooLargeError(HeaderError):
    """The declared header length exceeds 100,000,000 bytes or the file's size."""


class HeaderEncodingError(HeaderError):
    """The header bytes are not valid UTF-8."""


class HeaderJsonError(HeaderError):
    """The header is not a JSON object (malformed JSON, or another JSON type)."""


class DuplicateKeyError(HeaderError):
    """A tensor name appears twice in one header."""


class UnknownDtypeError(HeaderError):
    """A tensor's dtype string is not one safetensors defines (or torch cannot hold)."""


class InvalidShapeError(HeaderError):
    """A shape is not a list of non-negative integers."""


class InvalidTensorEntryError(HeaderError):
    """A tensor entry is not an object holding ``dtype``, ``shape`` and ``data_offsets`` (extra fields are ignored, as safetensors does)."""


class InvalidOffsetsError(HeaderError):
    """``data_offsets`` are not two integers with ``0 <= begin <= end``."""


class TensorSizeMismatchError(HeaderError):
    """``end - begin`` differs from ``numel * itemsize`` for a tensor."""


class OffsetGapError(HeaderError):
    """Tensors do not tile the data section: a gap between two tensors, or a first offset != 0."""


class OffsetOverlapError(HeaderError):
    """Two tensors' byte ranges overlap."""


class DataSizeMismatchError(HeaderError):
    """The last tensor's end differs from the data section's size (truncated file or trailing bytes)."""


class InvalidMetadataError(HeaderError):
    """``__metadata__`` is not a mapping from strings to strings."""


# --- checkpoint-level rules (index, snapshot, files) ---


class InvalidIndexError(CheckpointCorruptError):
    """``model.safetensors.index.json`` is malformed or inconsistent with the files."""


class UnsafePathError(CheckpointCorruptError):
    """The index names a file outside the checkpoint directory."""


class MissingFileError(CheckpointCorruptError):
    """A file the index lists does not exist."""


class MissingKeyError(CheckpointCorruptError):
    """A key the index lists is absent from the file it names."""


class FileSizeMismatchError(CheckpointCorruptError):
    """A file's size differs from the size recorded in the index (truncated or appended)."""


class SnapshotMismatchError(CheckpointCorruptError):
    """A data file belongs to another save than the index (a stale or foreign file)."""


class ChecksumMismatchError(CheckpointCorruptError):
    """A file's bytes do not match the checksum computed while it was written."""


# --- a file that ends before the bytes being read -----------------------------------------------


class _Paths(Protocol):
    """What names a checkpoint's files: a storage backend, or one load's pinned view of it."""

    def path(self, name: str) -> str: ...


class _AtEof:
    """A context manager: an ``EOFError`` raised inside becomes ``error(path of the file, the EOFError)``."""

    __slots__ = ("_files", "_name", "_error")

    def __init__(self, files: _Paths, name: str, error: Callable[[str, EOFError], CheckpointCorruptError]) -> None:
        self._files, self._name, self._error = files, name, error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(value, EOFError):
            # The path once the read failed: a pinned view names the copy it opened (staging or final place).
            raise self._error(self._files.path(self._name), value) from None


def truncated(files: _Paths, name: str, what: str) -> _AtEof:
    """Reading ``what`` from file ``name``: an EOFError inside (the file ends before the bytes
    read) is a :class:`CheckpointCorruptError` ``"<path>: truncated while reading <what>: <eof>"``.

    Example:
        >>> class Files:
        ...     def path(self, name): return "/ckpt/" + name
        >>> with truncated(Files(), "model.safetensors", "tensor 'w'"):
        ...     raise EOFError("file ends before byte 96")
        Traceback (most recent call last):
        ...
        dcp_safetensors.errors.CheckpointCorruptError: /ckpt/model.safetensors: truncated while reading tensor 'w': file ends before byte 96
    """
    return _AtEof(files, name, lambda path, eof: CheckpointCorruptError(f"{path}: truncated while reading {what}: {eof}"))


def shrank(files: _Paths, name: str) -> _AtEof:
    """Checking file ``name`` against the size its header and index record: an EOFError inside
    is a :class:`FileSizeMismatchError` ``"<path>: shrank while being checked (<eof>)"``."""
    return _AtEof(files, name, lambda path, eof: FileSizeMismatchError(f"{path}: shrank while being checked ({eof})"))
