"""The safetensors file format: dtype table, header encoding, header parsing.

Pure functions over bytes and plain Python values; nothing here touches
``torch.distributed`` or storage. A safetensors file is::

    [8-byte little-endian N][N bytes of UTF-8 JSON, space-padded][data section]

The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the data section) plus an optional ``__metadata__``
string map. :func:`parse_header` enforces every rule of the format and raises
one named error type per rule, before allocating anything sized by the file's
claims; :func:`encode_header` writes what ``safetensors.torch.save_file`` would.

Example:
    >>> header = encode_header([TensorEntry("w", "F32", (2, 2), 0, 16)], {"format": "pt"})
    >>> len(header) % 8
    0
    >>> parsed = parse_header(header, len(header) + 16)
    >>> parsed.tensors["w"].shape, parsed.data_start == len(header)
    ((2, 2), True)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dcp_safetensors.errors import (
    DataSizeMismatchError,
    DuplicateKeyError,
    HeaderEncodingError,
    HeaderJsonError,
    HeaderTooLargeError,
    HeaderTooSmallError,
    InvalidMetadataError,
    InvalidOffsetsError,
    InvalidShapeError,
    InvalidTensorEntryError,
    OffsetGapError,
    OffsetOverlapError,
    TensorSizeMismatchError,
    UnknownDtypeError,
)

__all__ = [
    "DTYPE_ITEMSIZE",
    "MAX_HEADER_SIZE",
    "TensorEntry",
    "Header",
    "dtype_sort_key",
    "tensor_nbytes",
    "encode_header",
    "parse_header",
    "header_length",
]

MAX_HEADER_SIZE = 100_000_000
"""safetensors refuses headers longer than this many bytes."""

LENGTH_PREFIX = 8

# Ordered as safetensors' Rust ``Dtype`` enum. ``save_file`` sorts tensors by this
# rank descending (then by name): widest types first, so every tensor lands at an
# offset that is a multiple of its item size once the header is 8-byte padded.
_DTYPE_ORDER: tuple[tuple[str, int], ...] = (
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E5M2", 1),
    ("F8_E4M3", 1),
    ("F8_E8M0", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("C64", 8),
    ("F64", 8),
    ("I64", 8),
    ("U64", 8),
)
DTYPE_ITEMSIZE: dict[str, int] = dict(_DTYPE_ORDER)
_DTYPE_RANK: dict[str, int] = {name: i for i, (name, _) in enumerate(_DTYPE_ORDER)}


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of safetensors ``dtype`` and ``shape``.

    Example:
        >>> tensor_nbytes("BF16", (3, 4))
        24
    """
    n = DTYPE_ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def dtype_sort_key(dtype: str, name: str) -> tuple[int, str]:
    """Sort key that orders tensors in a file exactly as ``save_file`` does.

    Example:
        >>> sorted([("a", "F16"), ("b", "F32"), ("c", "F32")], key=lambda t: dtype_sort_key(t[1], t[0]))
        [('b', 'F32'), ('c', 'F32'), ('a', 'F16')]
    """
    return (-_DTYPE_RANK[dtype], name)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry; ``begin``/``end`` are relative to the data section.

    Example:
        >>> TensorEntry("w", "BF16", (3,), 0, 6).nbytes
        6
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed, validated header.

    ``data_start`` is the absolute file offset of the data section (8 + header
    length), so tensor ``t`` occupies ``[data_start + t.begin, data_start + t.end)``.
    """

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int


_MAX_U64 = 2**64 - 1


def _nbytes_checked(shape: Iterable[int], itemsize: int) -> int | None:
    """``numel * itemsize``, or None where a partial product exceeds 64 bits.

    Mirrors safetensors' ``checked_mul`` (its ``ValidationOverflow``) and keeps
    a hostile shape from building, then printing, a number of millions of digits.
    """
    numel = 1
    for d in shape:
        numel *= d
        if numel > _MAX_U64:
            return None
    nbytes = numel * itemsize
    return nbytes if nbytes <= _MAX_U64 else None


def encode_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and JSON header for ``entries``, padded to a multiple of 8 bytes.

    ``entries`` are written in the order given (use :func:`dtype_sort_key` to
    match ``save_file``); their offsets must already tile the data section.

    Example:
        >>> encode_header([], {"format": "pt"})
        b' \\x00\\x00\\x00\\x00\\x00\\x00\\x00{"__metadata__":{"format":"pt"}}'
    """
    body: dict[str, object] = {}
    if metadata is not None:
        body["__metadata__"] = dict(sorted(metadata.items()))
    for e in entries:
        body[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_SIZE:
        raise HeaderTooLargeError(
            f"header of {len(text)} bytes exceeds safetensors' limit of {MAX_HEADER_SIZE}: "
            "use a smaller max_shard_size so each file lists fewer tensors"
        )
    return struct.pack("<Q", len(text)) + text


def header_length(prefix: bytes, file_size: int, *, source: str = "<bytes>") -> int:
    """Validate the 8-byte length prefix and return the JSON header's length.

    Checked before anything sized by the file is read or allocated.

    Example:
        >>> header_length(b"\\x08" + b"\\x00" * 7, 100)
        8
    """
    if file_size < LENGTH_PREFIX or len(prefix) < LENGTH_PREFIX:
        raise HeaderTooSmallError(
            f"{source}: {file_size} bytes is too short for a safetensors file (needs an 8-byte header length)"
        )
    (n,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX])
    if n > MAX_HEADER_SIZE:
        raise HeaderTooLargeError(
            f"{source}: header length {n} exceeds safetensors' limit of {MAX_HEADER_SIZE} bytes"
        )
    if n > file_size - LENGTH_PREFIX:
        raise HeaderTooLargeError(
            f"{source}: header length {n} exceeds the file's remaining {file_size - LENGTH_PREFIX} bytes "
            "(file truncated or not safetensors)"
        )
    return n


def _reject_duplicates(source: str):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in pairs:
            if k in out:
                raise DuplicateKeyError(f"{source}: key {k!r} appears twice in the header")
            out[k] = v
        return out

    return hook


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(name: str, raw: object, source: str) -> TensorEntry:
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise InvalidTensorEntryError(
            f"{source}: entry {name!r} must be an object with dtype, shape and data_offsets, got {str(raw)[:200]}"
        )
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise UnknownDtypeError(
            f"{source}: tensor {name!r} has dtype {str(dtype)[:40]!r}; known: {', '.join(DTYPE_ITEMSIZE)}"
        )
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidShapeError(
            f"{source}: tensor {name!r} has shape {str(shape)[:200]}; expected a list of non-negative integers"
        )
    offs = raw["data_offsets"]
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(_is_int(o) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise InvalidOffsetsError(
            f"{source}: tensor {name!r} has data_offsets {str(offs)[:200]}; expected [begin, end] with 0 <= begin <= end"
        )
    begin, end = offs
    expected = _nbytes_checked(shape, DTYPE_ITEMSIZE[dtype])
    if expected is None:
        raise TensorSizeMismatchError(
            f"{source}: tensor {name!r} ({dtype}, shape {str(shape)[:200]}) has a byte size that "
            "overflows 64 bits"
        )
    if end - begin != expected:
        raise TensorSizeMismatchError(
            f"{source}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def parse_header(blob: bytes, file_size: int, *, source: str = "<bytes>") -> Header:
    """Parse and validate a safetensors header.

    ``blob`` starts at file offset 0 and holds at least the length prefix and
    the JSON header; ``file_size`` is the whole file's size, so the data
    section's size can be checked against the offsets. ``source`` names the
    file in error messages.

    Raises a :class:`~dcp_safetensors.errors.HeaderError` subclass naming the
    broken rule, the file and (where it applies) the tensor.

    Example:
        >>> parse_header(encode_header([], None), 16).tensors
        {}
    """
    n = header_length(blob, file_size, source=source)
    raw = blob[LENGTH_PREFIX : LENGTH_PREFIX + n]
    if len(raw) < n:
        raise HeaderTooSmallError(f"{source}: header needs {n} bytes but only {len(raw)} were given")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderEncodingError(f"{source}: header is not valid UTF-8 ({e})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates(source))
    except DuplicateKeyError:
        raise
    except (ValueError, RecursionError) as e:
        raise HeaderJsonError(f"{source}: header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise HeaderJsonError(f"{source}: header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidMetadataError(f"{source}: __metadata__ must map strings to strings, got {str(metadata)[:200]}")
    tensors = {name: _parse_entry(name, raw_entry, source) for name, raw_entry in obj.items()}
    data_size = file_size - LENGTH_PREFIX - n
    _check_tiling(sorted(tensors.values(), key=lambda t: (t.begin, t.end)), data_size, source)
    return Header(tensors, metadata, LENGTH_PREFIX + n, file_size)


def _check_tiling(entries: list[TensorEntry], data_size: int, source: str) -> None:
    position = 0
    previous = "the start of the data section"
    for e in entries:
        if e.begin > position:
            raise OffsetGapError(
                f"{source}: {e.begin - position} unused bytes between {previous} and tensor {e.name!r} "
                f"(offsets must start at 0 and be contiguous)"
            )
        if e.begin < position:
            raise OffsetOverlapError(f"{source}: tensor {e.name!r} starts at {e.begin}, inside {previous}")
        position = e.end
        previous = f"tensor {e.name!r}"
    if position != data_size:
        what = "truncated" if data_size < position else "has trailing bytes"
        raise DataSizeMismatchError(
            f"{source}: tensors end at data offset {position} but the data section is {data_size} bytes (file {what})"
        )
