"""Tests of ``dcp_safetensors.format``: the header rules, byte equivalence with safetensors, fuzzing.

The fuzz test runs ``DCP_SAFETENSORS_FUZZ_N`` inputs (default 3,000). The long run::

    DCP_SAFETENSORS_FUZZ_N=100000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_format.py -k fuzz

(also ``make fuzz``).
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dcp_safetensors import errors
from dcp_safetensors.errors import (
    CheckpointCorruptError,
    DataSizeMismatchError,
    DuplicateKeyError,
    HeaderEncodingError,
    HeaderError,
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
from dcp_safetensors.format import (
    DTYPE_ITEMSIZE,
    MAX_HEADER_SIZE,
    TensorEntry,
    dtype_sort_key,
    encode_header,
    header_length,
    parse_header,
)

SOURCE = "golden.safetensors"


def st_file(header: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """``[u64 little-endian length][header][data]``; ``length`` overrides the prefix."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def parse(blob: bytes, file_size: int | None = None):
    return parse_header(blob, len(blob) if file_size is None else file_size, source=SOURCE)


# --------------------------------------------------------------------------------------------
# Golden bytes: one case per rule parse_header enforces.
# Each case: (input bytes, file size or None for len(bytes), expected error, message regex).
# --------------------------------------------------------------------------------------------

GOLDEN_CASES = {
    # The 8-byte length prefix.
    "empty-file": (b"", None, HeaderTooSmallError, r"0 bytes is too short"),
    "seven-bytes": (b"\x08\x00\x00\x00\x00\x00\x00", None, HeaderTooSmallError, r"7 bytes is too short"),
    "blob-shorter-than-declared-header": (
        # The prefix says 16 header bytes and the file is large enough, but only 2 were given.
        struct.pack("<Q", 16) + b"{}",
        1000,
        HeaderTooSmallError,
        r"header needs 16 bytes but only 2",
    ),
    "length-over-100MB": (
        struct.pack("<Q", 100_000_001) + b"{}",
        200_000_000,
        HeaderTooLargeError,
        r"header length 100000001 exceeds safetensors' limit of 100000000",
    ),
    "length-2**64-1": (
        b"\xff" * 8 + b"{}",
        None,
        HeaderTooLargeError,
        r"header length 18446744073709551615 exceeds safetensors' limit",
    ),
    "length-over-file-size": (
        struct.pack("<Q", 100) + b"{}",
        None,
        HeaderTooLargeError,
        r"header length 100 exceeds the file's remaining 2 bytes",
    ),
    # Encoding and JSON.
    "not-utf8": (st_file(b'{"w\xff":{}}'), None, HeaderEncodingError, r"not valid UTF-8"),
    "truncated-utf8-sequence": (st_file(b'{"\xc3":1}   '), None, HeaderEncodingError, r"not valid UTF-8"),
    "malformed-json": (st_file(b'{"w":{"dtype":'), None, HeaderJsonError, r"not valid JSON"),
    "json-array": (st_file(b"[]      "), None, HeaderJsonError, r"must be a JSON object, got list"),
    "json-string": (st_file(b'"abc"   '), None, HeaderJsonError, r"must be a JSON object, got str"),
    "json-too-many-digits": (st_file(b'{"a":' + b"9" * 5000 + b"}"), None, HeaderJsonError, r"not valid JSON"),
    "deeply-nested-arrays": (st_file(b"[" * 100_000), None, HeaderJsonError, r"not valid JSON"),
    "deeply-nested-in-entry": (
        st_file(b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        None,
        HeaderJsonError,
        r"not valid JSON",
    ),
    "deeply-nested-objects": (st_file(b'{"a":' * 100_000), None, HeaderJsonError, r"not valid JSON"),
    # Keys.
    "duplicate-tensor-name": (
        st_file(
            b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
        ),
        None,
        DuplicateKeyError,
        r"key 'w' appears twice",
    ),
    "duplicate-field-in-entry": (
        st_file(b'{"w":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}}'),
        None,
        DuplicateKeyError,
        r"key 'dtype' appears twice",
    ),
    "duplicate-metadata": (
        st_file(b'{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}'),
        None,
        DuplicateKeyError,
        r"key '__metadata__' appears twice",
    ),
    # dtype.
    "unknown-dtype": (
        st_file(b'{"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}'),
        None,
        UnknownDtypeError,
        r"tensor 'w' has dtype 'F33'",
    ),
    "lower-case-dtype": (
        st_file(b'{"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}'),
        None,
        UnknownDtypeError,
        r"tensor 'w' has dtype 'f32'",
    ),
    "dtype-not-a-string": (
        st_file(b'{"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}}'),
        None,
        UnknownDtypeError,
        r"tensor 'w' has dtype '4'",
    ),
    # shape.
    "negative-shape": (
        st_file(b'{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}'),
        None,
        InvalidShapeError,
        r"tensor 'w' has shape \[-1\]",
    ),
    "float-shape": (
        st_file(b'{"w":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}'),
        None,
        InvalidShapeError,
        r"tensor 'w' has shape \[2\.0\]",
    ),
    "bool-shape": (
        st_file(b'{"w":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}'),
        None,
        InvalidShapeError,
        r"tensor 'w' has shape \[True\]",
    ),
    "shape-not-a-list": (
        st_file(b'{"w":{"dtype":"U8","shape":2,"data_offsets":[0,2]}}'),
        None,
        InvalidShapeError,
        r"tensor 'w' has shape 2;",
    ),
    "shape-null": (
        st_file(b'{"w":{"dtype":"U8","shape":null,"data_offsets":[0,1]}}'),
        None,
        InvalidShapeError,
        r"tensor 'w' has shape None",
    ),
    "shape-nested-list": (
        st_file(b'{"w":{"dtype":"U8","shape":[[2]],"data_offsets":[0,2]}}'),
        None,
        InvalidShapeError,
        r"tensor 'w' has shape \[\[2\]\]",
    ),
    # Entry structure.
    "entry-not-an-object": (
        st_file(b'{"w":[1,2]}'), None, InvalidTensorEntryError, r"entry 'w' must be an object"
    ),
    "entry-null": (st_file(b'{"w":null}'), None, InvalidTensorEntryError, r"entry 'w' must be an object"),
    "entry-missing-data-offsets": (
        st_file(b'{"w":{"dtype":"U8","shape":[1]}}'),
        None,
        InvalidTensorEntryError,
        r"entry 'w' must be an object with dtype, shape and data_offsets",
    ),
    "entry-missing-dtype": (
        st_file(b'{"w":{"shape":[1],"data_offsets":[0,1]}}'),
        None,
        InvalidTensorEntryError,
        r"entry 'w' must be an object",
    ),
    # data_offsets.
    "offsets-one-int": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[1]}}'),
        None,
        InvalidOffsetsError,
        r"tensor 'w' has data_offsets \[1\]",
    ),
    "offsets-three-ints": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}'),
        None,
        InvalidOffsetsError,
        r"data_offsets \[0, 1, 2\]",
    ),
    "offsets-string": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}}'),
        None,
        InvalidOffsetsError,
        r"data_offsets \[0, '1'\]",
    ),
    "offsets-float": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0.0,1]}}'),
        None,
        InvalidOffsetsError,
        r"data_offsets \[0\.0, 1\]",
    ),
    "offsets-bool": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[false,true]}}'),
        None,
        InvalidOffsetsError,
        r"data_offsets \[False, True\]",
    ),
    "offsets-not-a-list": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":{"0":1}}}'),
        None,
        InvalidOffsetsError,
        r"tensor 'w' has data_offsets",
    ),
    "offsets-begin-after-end": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[2,1]}}'),
        None,
        InvalidOffsetsError,
        r"data_offsets \[2, 1\]; expected \[begin, end\] with 0 <= begin <= end",
    ),
    "offsets-negative": (
        st_file(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}'),
        None,
        InvalidOffsetsError,
        r"data_offsets \[-1, 0\]",
    ),
    # Size of each tensor.
    "size-mismatch": (
        st_file(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\x00" * 4),
        None,
        TensorSizeMismatchError,
        r"tensor 'w' \(F32, shape \[2\]\) needs 8 bytes but data_offsets \[0, 4\] hold 4",
    ),
    "shape-product-overflows-2**64": (
        # 2**40 * 2**40 elements: safetensors' checked_mul fails; so must we (without a 2**80 compare).
        st_file(b'{"w":{"dtype":"U8","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}'),
        None,
        TensorSizeMismatchError,
        r"tensor 'w' .* overflows 64 bits",
    ),
    "single-dim-2**64": (
        st_file(b'{"w":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,0]}}'),
        None,
        TensorSizeMismatchError,
        r"overflows 64 bits",
    ),
    "byte-size-overflows-2**64": (
        # 2**61 F64 elements = 2**64 bytes.
        st_file(b'{"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}'),
        None,
        TensorSizeMismatchError,
        r"overflows 64 bits",
    ),
    "shape-product-of-5000-digits": (
        # Used to escape as ValueError (int too large to print in the message); see report.
        st_file(b'{"w":{"dtype":"U8","shape":[' + b",".join([b"1" + b"0" * 100] * 50) + b'],"data_offsets":[0,1]}}'),
        None,
        TensorSizeMismatchError,
        r"overflows 64 bits",
    ),
    # Tiling of the data section.
    "first-offset-not-zero": (
        st_file(b'{"w":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"\x00" * 3),
        None,
        OffsetGapError,
        r"1 unused bytes between the start of the data section and tensor 'w'",
    ),
    "gap-between-tensors": (
        st_file(
            b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
            b'"b":{"dtype":"U8","shape":[2],"data_offsets":[5,7]}}',
            b"\x00" * 7,
        ),
        None,
        OffsetGapError,
        r"3 unused bytes between tensor 'a' and tensor 'b'",
    ),
    "overlap": (
        st_file(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            b'"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}',
            b"\x00" * 6,
        ),
        None,
        OffsetOverlapError,
        r"tensor 'b' starts at 2, inside tensor 'a'",
    ),
    "zero-size-tensor-inside-another": (
        st_file(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            b'"z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}',
            b"\x00" * 4,
        ),
        None,
        OffsetOverlapError,
        r"tensor 'z' starts at 2, inside tensor 'a'",
    ),
    "same-range-twice": (
        st_file(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            b'"b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}',
            b"\x00" * 4,
        ),
        None,
        OffsetOverlapError,
        r"starts at 0, inside tensor",
    ),
    "data-truncated": (
        st_file(b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"\x00" * 3),
        None,
        DataSizeMismatchError,
        r"tensors end at data offset 4 but the data section is 3 bytes \(file truncated\)",
    ),
    "data-trailing-bytes": (
        st_file(b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"\x00" * 5),
        None,
        DataSizeMismatchError,
        r"tensors end at data offset 4 but the data section is 5 bytes \(file has trailing bytes\)",
    ),
    "no-tensors-but-data": (st_file(b"{}", b"\x00"), None, DataSizeMismatchError, r"data section is 1 bytes"),
    # __metadata__.
    "metadata-int-value": (
        st_file(b'{"__metadata__":{"format":1}}'),
        None,
        InvalidMetadataError,
        r"__metadata__ must map strings to strings, got \{'format': 1\}",
    ),
    "metadata-null-value": (
        st_file(b'{"__metadata__":{"format":null}}'),
        None,
        InvalidMetadataError,
        r"__metadata__ must map strings to strings",
    ),
    "metadata-nested-object": (
        st_file(b'{"__metadata__":{"a":{"b":"c"}}}'),
        None,
        InvalidMetadataError,
        r"__metadata__ must map strings to strings",
    ),
    "metadata-list": (
        st_file(b'{"__metadata__":["format","pt"]}'),
        None,
        InvalidMetadataError,
        r"got \['format', 'pt'\]",
    ),
    "metadata-string": (st_file(b'{"__metadata__":"pt"}'), None, InvalidMetadataError, r"got pt"),
}


@pytest.mark.parametrize("case", list(GOLDEN_CASES), ids=list(GOLDEN_CASES))
def test_golden_rule_violation(case: str) -> None:
    blob, file_size, error, pattern = GOLDEN_CASES[case]
    with pytest.raises(error, match=pattern) as info:
        parse(blob, file_size)
    # The exact type, not a sibling or a parent; the message names the file.
    assert type(info.value) is error
    assert isinstance(info.value, HeaderError) and isinstance(info.value, CheckpointCorruptError)
    assert str(info.value).startswith(SOURCE + ": ")


def test_golden_cases_cover_every_header_error() -> None:
    rule_types = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, HeaderError)}
    rule_types.discard(HeaderError)
    covered = {error for _, _, error, _ in GOLDEN_CASES.values()}
    assert covered == rule_types


def test_golden_valid_file() -> None:
    header = (
        b'{"__metadata__":{"format":"pt"},'
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a":{"dtype":"BF16","shape":[],"data_offsets":[8,10]},'
        b'"z":{"dtype":"I64","shape":[0,3],"data_offsets":[10,10]}}'
    )
    header += b" " * (-len(header) % 8)
    blob = st_file(header, bytes(range(10)))
    parsed = parse(blob)
    assert parsed.metadata == {"format": "pt"}
    assert parsed.data_start == 8 + len(header)
    assert parsed.file_size == len(blob)
    assert parsed.tensors == {
        "b": TensorEntry("b", "F32", (2,), 0, 8),
        "a": TensorEntry("a", "BF16", (), 8, 10),
        "z": TensorEntry("z", "I64", (0, 3), 10, 10),
    }


def test_golden_edge_cases_accepted() -> None:
    # No tensors, no metadata: the smallest file.
    assert parse(st_file(b"{}")).tensors == {}
    # "__metadata__": null means no metadata (serde's Option).
    assert parse(st_file(b'{"__metadata__":null}')).metadata is None
    # An empty metadata map is a map.
    assert parse(st_file(b'{"__metadata__":{}}')).metadata == {}
    # Padding with spaces and leading whitespace are JSON whitespace.
    assert parse(st_file(b' {}     ')).tensors == {}
    # A zero-size tensor may sit at the end, at the same offset as the end of another.
    hdr = b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"z":{"dtype":"F64","shape":[0],"data_offsets":[2,2]}}'
    assert set(parse(st_file(hdr, b"ab")).tensors) == {"a", "z"}
    # Extra fields in an entry are ignored, as safetensors ignores them.
    hdr = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}'
    assert parse(st_file(hdr, b"a")).tensors["a"].shape == (1,)
    # A byte size of exactly 2**64 - 1 does not overflow (the file size is only claimed).
    hdr = b'{"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}'
    big = parse_header(st_file(hdr), 8 + len(hdr) + 2**64 - 1)
    assert big.tensors["a"].nbytes == 2**64 - 1
    # Header length exactly MAX_HEADER_SIZE is allowed by the prefix check.
    assert header_length(struct.pack("<Q", MAX_HEADER_SIZE), MAX_HEADER_SIZE + 8) == MAX_HEADER_SIZE


def test_encode_header_golden() -> None:
    assert encode_header([], None) == b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    # An empty map is still written (save_file writes it too where it has a tensor to write).
    assert encode_header([], {}) == b"\x18\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{}}     '
    # Metadata keys sorted; 97 JSON bytes padded with 7 spaces to 104 (0x68).
    assert encode_header([TensorEntry("wx", "F32", (2, 2), 0, 16)], {"format": "pt", "a": "b"}) == (
        b"\x68\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"a":"b","format":"pt"},"wx":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
        b"       "
    )
    # Not ASCII-escaped, as serde_json writes it.
    assert encode_header([TensorEntry("é", "U8", (0,), 0, 0)], None)[8:].startswith('{"é":'.encode())


def test_encode_header_refuses_headers_over_the_limit() -> None:
    entries = [TensorEntry("x" * MAX_HEADER_SIZE, "U8", (0,), 0, 0)]
    with pytest.raises(HeaderTooLargeError, match="exceeds safetensors' limit"):
        encode_header(entries, None)


# --------------------------------------------------------------------------------------------
# Byte equivalence with safetensors.torch.save_file.
# --------------------------------------------------------------------------------------------

TORCH_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "C64": "complex64",
}


def test_dtype_table_matches_safetensors() -> None:
    assert set(TORCH_DTYPES) == set(DTYPE_ITEMSIZE)
    for code, torch_name in TORCH_DTYPES.items():
        dtype = getattr(torch, torch_name)
        assert torch.empty((), dtype=dtype).element_size() == DTYPE_ITEMSIZE[code], code
        # safetensors' own name for the dtype, as its writer records it.
        raw = safetensors.torch.save({"x": torch.zeros(1, dtype=dtype)})
        (n,) = struct.unpack("<Q", raw[:8])
        assert json.loads(raw[8 : 8 + n])["x"]["dtype"] == code


def torch_dtype(code: str) -> torch.dtype:
    return getattr(torch, TORCH_DTYPES[code])


def make_tensor(code: str, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """A tensor of random bytes (any bit pattern, NaNs included; 0/1 for bool)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_ITEMSIZE[code]
    if nbytes == 0:
        return torch.empty(shape, dtype=torch_dtype(code))
    raw = rng.integers(0, 256, size=nbytes, dtype=np.uint8)
    if code == "BOOL":
        raw &= 1
    return torch.from_numpy(raw).view(torch_dtype(code)).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def our_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file built only from this package's encode_header and dtype_sort_key."""
    code_of = {torch_dtype(c): c for c in TORCH_DTYPES}
    order = sorted(tensors, key=lambda name: dtype_sort_key(code_of[tensors[name].dtype], name))
    entries, chunks, position = [], [], 0
    for name in order:
        data = tensor_bytes(tensors[name])
        code = code_of[tensors[name].dtype]
        entries.append(TensorEntry(name, code, tuple(tensors[name].shape), position, position + len(data)))
        chunks.append(data)
        position += len(data)
    return encode_header(entries, metadata) + b"".join(chunks)


def save_file_bytes(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    path = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def check_equivalent(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    reference = save_file_bytes(tmp_path, tensors, metadata)
    ours = our_file(tensors, metadata)
    assert ours == reference
    # parse_header accepts save_file's output and finds every tensor where it is.
    parsed = parse_header(reference, len(reference), source="reference")
    assert parsed.metadata == metadata
    assert set(parsed.tensors) == set(tensors)
    for name, t in tensors.items():
        e = parsed.tensors[name]
        assert e.shape == tuple(t.shape)
        assert reference[parsed.data_start + e.begin : parsed.data_start + e.end] == tensor_bytes(t)
    # safetensors reads our file.
    ours_path = tmp_path / "ours.safetensors"
    ours_path.write_bytes(ours)
    with safetensors.safe_open(str(ours_path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == metadata
        for name, t in tensors.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == t.dtype and loaded.shape == t.shape
            assert tensor_bytes(loaded) == tensor_bytes(t)


def _safetensors_accepts(code: str) -> str | None:
    """None if save_file writes this dtype, else the reason it refuses."""
    try:
        safetensors.torch.save(
            {"x": torch.zeros(2, dtype=torch_dtype(code))}, metadata=None
        )
    except Exception as e:  # noqa: BLE001 - any refusal is a reason to skip this dtype
        return f"safetensors {safetensors.__version__} cannot save {TORCH_DTYPES[code]}: {e}"
    return None


@pytest.mark.parametrize("code", list(TORCH_DTYPES))
def test_byte_identical_to_save_file_per_dtype(tmp_path: Path, code: str) -> None:
    reason = _safetensors_accepts(code)
    if reason is not None:
        pytest.skip(reason)
    rng = np.random.default_rng(sum(code.encode()))
    tensors = {
        "layers.0.weight": make_tensor(code, (3, 5), rng),
        "layers.10.weight": make_tensor(code, (7,), rng),
        "layers.2.bias": make_tensor(code, (2, 1, 3), rng),
        "scalar": make_tensor(code, (), rng),
        "empty": make_tensor(code, (0,), rng),
        "empty.2d": make_tensor(code, (4, 0), rng),
        "πρόσθετο.重み": make_tensor(code, (2, 2), rng),
    }
    check_equivalent(tmp_path, tensors, {"format": "pt"})


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None, {}, {"ключ": "значение \"q\" \n"}])
def test_byte_identical_to_save_file_all_dtypes_in_one_file(tmp_path: Path, metadata) -> None:
    rng = np.random.default_rng(7)
    codes = [c for c in TORCH_DTYPES if _safetensors_accepts(c) is None]
    tensors: dict[str, torch.Tensor] = {}
    for i, code in enumerate(codes):
        # Odd sizes of narrow types placed before wide ones would misalign: the order prevents it.
        tensors[f"t.{i}.{code.lower()}"] = make_tensor(code, (3, i % 3 + 1), rng)
        tensors[f"z.{i}"] = make_tensor(code, (), rng)
        tensors[f"e.{i}"] = make_tensor(code, (0, 2), rng)
    tensors['name with "quotes", \\ and \t\x01 controls'] = make_tensor("F32", (1,), rng)
    tensors["日本語"] = make_tensor("U8", (5,), rng)
    check_equivalent(tmp_path, tensors, metadata)


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
            st.sampled_from(sorted(DTYPE_ITEMSIZE)),
            st.lists(st.integers(0, 3), max_size=3),
        ),
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_byte_identical_to_safetensors_save_random_names(items, metadata, seed) -> None:
    """Random (non-ASCII, control-character) names: JSON escaping and order equal safetensors'.

    At most one metadata key: safetensors keeps ``__metadata__`` in a hash map,
    so the order of several keys in its output is not deterministic. No tensors
    with an empty metadata map is left out: safetensors 0.8 writes invalid JSON
    for it (``{},"__metadata__":{}}``); see test_encode_header_golden.
    """
    assume(items or metadata != {})
    rng = np.random.default_rng(seed)
    tensors = {name: make_tensor(code, tuple(shape), rng) for name, code, shape in items}
    reference = safetensors.torch.save(tensors, metadata=metadata)
    assert our_file(tensors, metadata) == reference


# --------------------------------------------------------------------------------------------
# Round trip property.
# --------------------------------------------------------------------------------------------

entries_strategy = st.lists(
    st.tuples(
        st.text(max_size=16).filter(lambda s: s != "__metadata__"),
        st.sampled_from(sorted(DTYPE_ITEMSIZE)),
        st.lists(st.integers(0, 2**12), max_size=4),
    ),
    max_size=12,
    unique_by=lambda t: t[0],
)


@settings(max_examples=200, deadline=None)
@given(
    items=entries_strategy,
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4)),
    data=st.data(),
)
def test_encode_parse_round_trip(items, metadata, data) -> None:
    entries, position = [], 0
    for name, code, shape in sorted(items, key=lambda t: dtype_sort_key(t[1], t[0])):
        nbytes = math.prod(shape) * DTYPE_ITEMSIZE[code]
        entries.append(TensorEntry(name, code, tuple(shape), position, position + nbytes))
        position += nbytes
    # encode_header writes entries in the order given; any order of contiguous offsets parses.
    shuffled = data.draw(st.permutations(entries))
    header = encode_header(shuffled, metadata)
    (n,) = struct.unpack("<Q", header[:8])
    assert n == len(header) - 8
    assert len(header) % 8 == 0 and n % 8 == 0
    # The JSON text keeps the order given.
    text = json.loads(header[8:].decode("utf-8"))
    assert [k for k in text if k != "__metadata__"] == [e.name for e in shuffled]
    # The data section is not read: a blob holding only the header suffices.
    parsed = parse_header(header, len(header) + position)
    assert parsed.tensors == {e.name: e for e in entries}
    assert parsed.metadata == metadata
    assert parsed.data_start == len(header)
    assert parsed.file_size == len(header) + position


# --------------------------------------------------------------------------------------------
# Fuzzing: every input either parses or raises a HeaderError subclass.
# --------------------------------------------------------------------------------------------

FUZZ_N = int(os.environ.get("DCP_SAFETENSORS_FUZZ_N", "3000"))
FUZZ_SEED = int(os.environ.get("DCP_SAFETENSORS_FUZZ_SEED", "20240611"))

_INTERESTING_INTS = [
    0, 1, -1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
    2**64 - 1, 2**64, 2**65, -(2**63), 10**300, -(10**300), MAX_HEADER_SIZE, MAX_HEADER_SIZE + 1,
]
_INTERESTING_STRINGS = [
    "", "F32", "U8", "BOOL", "F8_E4M3", "C64", "F4", "F8_E4M3FNUZ", "__metadata__", "dtype", "shape",
    "data_offsets", "format", "pt", "w", "\x00", "\ud7ff", "é", "🙂", "a" * 300,
]
_TOKENS = [
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"null", b"true", b"false", b"NaN", b"-Infinity",
    b"1e400", b"-0", b"18446744073709551616", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b" ", b"\n",
    b'"__metadata__"', b'"dtype"', b'"shape"', b'"data_offsets"', b"9" * 5000,
]


def _random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(_INTERESTING_INTS) + rng.choice([0, 0, 1, -1])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1.5, 1e308, float("inf"), float("nan"), 2.0])
    if kind == 4:
        return rng.choice(_INTERESTING_STRINGS)
    if kind == 5:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(6)))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return [rng.choice(_INTERESTING_INTS) for _ in range(rng.randrange(1, 6))]
    return {rng.choice(_INTERESTING_STRINGS): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _seed_files(rng: random.Random, count: int = 24) -> list[bytes]:
    """Valid files: random dtypes and shapes (0-dim and empty ones included), with and without metadata."""
    files = []
    for _ in range(count):
        specs = []
        for i in range(rng.randrange(0, 6)):
            code = rng.choice(sorted(DTYPE_ITEMSIZE))
            shape = tuple(rng.randrange(0, 4) for _ in range(rng.randrange(0, 4)))
            specs.append((rng.choice(["w", "layers.", "é", "名"]) + str(i), code, shape))
        entries, position = [], 0
        for name, code, shape in sorted(specs, key=lambda s: dtype_sort_key(s[1], s[0])):
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_ITEMSIZE[code]
            entries.append(TensorEntry(name, code, shape, position, position + nbytes))
            position += nbytes
        metadata = rng.choice([None, {}, {"format": "pt"}, {"format": "pt", "k": "v"}])
        data = bytes(rng.randrange(256) for _ in range(position))
        files.append(encode_header(entries, metadata) + data)
    return files


def _reframe(header_text: bytes, data: bytes, rng: random.Random) -> bytes:
    """A file around new header text: usually a correct prefix, sometimes padded or off by a bit."""
    if rng.random() < 0.5:
        header_text += b" " * (-len(header_text) % 8)
    length = len(header_text)
    if rng.random() < 0.1:
        length += rng.choice([-8, -1, 1, 8, 2**32, 2**63])
        length = max(length, 0)
    return struct.pack("<Q", length) + header_text + data


def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _mutate_json(blob: bytes, rng: random.Random) -> bytes:
    obj, data = _split(blob)
    names = [k for k in obj if k != "__metadata__"]
    choice = rng.randrange(9)
    if choice == 0 and names:  # replace one field of one entry
        name = rng.choice(names)
        obj[name][rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
    elif choice == 1 and names:  # replace an element of shape or data_offsets
        entry = obj[rng.choice(names)]
        field = rng.choice(["shape", "data_offsets"])
        if entry[field]:
            entry[field][rng.randrange(len(entry[field]))] = rng.choice(
                [_random_json(rng), rng.choice(_INTERESTING_INTS)]
            )
        else:
            entry[field].append(rng.choice(_INTERESTING_INTS))
    elif choice == 2 and names:  # replace a whole entry
        obj[rng.choice(names)] = _random_json(rng)
    elif choice == 3:  # metadata
        obj["__metadata__"] = _random_json(rng)
    elif choice == 4 and names:  # drop a field or a whole entry
        name = rng.choice(names)
        if rng.random() < 0.5:
            del obj[name]
        else:
            obj[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    elif choice == 5 and names:  # huge shapes: products far beyond 2**64
        entry = obj[rng.choice(names)]
        big = rng.choice([2**32, 2**40, 2**64 - 1, 2**64, 10**100, 10**1000, 10**4000])
        entry["shape"] = [big] * rng.randrange(1, 60)
        if rng.random() < 0.3:
            entry["shape"].append(0)
    elif choice == 6 and names:  # shift offsets: gaps, overlaps, truncations
        entry = obj[rng.choice(names)]
        delta = rng.choice([-2, -1, 1, 2, 8])
        if rng.random() < 0.5:  # move the tensor: a gap or an overlap
            entry["data_offsets"] = [o + delta for o in entry["data_offsets"]]
        else:  # resize it
            entry["data_offsets"] = [o + delta * rng.randrange(2) for o in entry["data_offsets"]]
    elif choice == 7:  # a new entry
        obj[rng.choice(_INTERESTING_STRINGS) + str(rng.randrange(3))] = {
            "dtype": rng.choice(_INTERESTING_STRINGS[:8]),
            "shape": [rng.randrange(4) for _ in range(rng.randrange(3))],
            "data_offsets": [rng.choice(_INTERESTING_INTS) for _ in range(2)],
        }
    else:  # the whole header another JSON value
        obj = _random_json(rng)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.3, separators=rng.choice([(",", ":"), (", ", ": ")]))
    if choice != 8 and rng.random() < 0.05 and names:  # a duplicate key, at the text level
        dup = json.dumps(rng.choice(names))
        text = text[:-1] + ("," if len(text) > 2 else "") + f'{dup}:{{}}' + "}"
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)] + bytes(rng.randrange(3))
    return _reframe(text.encode("utf-8", "surrogatepass"), data, rng)


def _mutate_bytes(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    if len(b) < 8:
        return bytes(b + bytes(rng.randrange(256) for _ in range(rng.randrange(10))))
    # The header length as declared, clamped to the bytes present.
    n = min(struct.unpack("<Q", bytes(b[:8]))[0], len(b) - 8)
    choice = rng.randrange(7)
    if choice == 0:  # bit flips anywhere
        for _ in range(rng.randrange(1, 9)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncation
        del b[rng.randrange(len(b) + 1) :]
    elif choice == 2:  # insert random bytes or JSON tokens inside the header, then fix the prefix
        pos = rng.randrange(8, 8 + n + 1)
        ins = rng.choice(_TOKENS) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(4))
        b[pos:pos] = ins
        if rng.random() < 0.8:
            b[:8] = struct.pack("<Q", n + len(ins))
    elif choice == 3 and n > 0:  # delete a range inside the header, then fix the prefix
        lo = rng.randrange(8, 8 + n)
        hi = min(8 + n, lo + rng.randrange(1, 8))
        del b[lo:hi]
        b[:8] = struct.pack("<Q", n - (hi - lo))
    elif choice == 4:  # a random or extreme length prefix
        b[:8] = struct.pack(
            "<Q", rng.choice([0, 1, 7, 9, 2**32, 2**63, 2**64 - 1, MAX_HEADER_SIZE, MAX_HEADER_SIZE + 1,
                              rng.randrange(len(b) + 16)])
        )
    elif choice == 5:  # deep nesting inserted into the header
        depth = rng.choice([10, 900, 1000, 5000, 100_000])
        nest = rng.choice([b"[", b'{"a":']) * depth
        if rng.random() < 0.5:
            nest += (b"]" if nest[:1] == b"[" else b"}") * depth
        pos = rng.randrange(8, 8 + n + 1)
        b[pos:pos] = nest
        b[:8] = struct.pack("<Q", n + len(nest))
    else:  # append or remove data bytes
        if rng.random() < 0.5:
            b += bytes(rng.randrange(1, 9))
        else:
            del b[max(8, len(b) - rng.randrange(1, 9)) :]
    return bytes(b)


def fuzz_input(seeds: list[bytes], i: int) -> tuple[bytes, int]:
    rng = random.Random(FUZZ_SEED * 1_000_003 + i)
    blob = rng.choice(seeds)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if rng.random() < 0.5:
            try:
                blob = _mutate_json(blob, rng)
                continue
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, struct.error):
                pass  # an earlier mutation broke the JSON: mutate bytes instead
        blob = _mutate_bytes(blob, rng)
    file_size = len(blob)
    if rng.random() < 0.1:  # the claimed file size disagrees with the bytes given
        file_size = max(0, file_size + rng.choice([-9, -1, 1, 4096, 2**40]))
    return blob, file_size


def test_fuzz_parse_header_raises_only_header_errors() -> None:
    seeds = _seed_files(random.Random(FUZZ_SEED))
    for s in seeds:  # the seeds themselves are valid
        parse_header(s, len(s))
    outcomes: Counter[str] = Counter()
    failures = []
    for i in range(FUZZ_N):
        blob, file_size = fuzz_input(seeds, i)
        try:
            header = parse_header(blob, file_size, source="fuzz.safetensors")
        except HeaderError as e:
            outcomes[type(e).__name__] += 1
            if not str(e).startswith("fuzz.safetensors: "):
                failures.append((i, f"message does not name the file: {e}"))
        except Exception as e:  # noqa: BLE001 - the point of the test
            failures.append((i, f"{type(e).__name__}: {str(e)[:200]} on {blob[:300]!r}"))
        else:
            outcomes["accepted"] += 1
            # An accepted header describes a data section that its tensors tile exactly.
            data_size = file_size - header.data_start
            assert header.data_start <= file_size
            assert sum(t.nbytes for t in header.tensors.values()) == data_size, i
            assert all(t.nbytes == math.prod(t.shape) * DTYPE_ITEMSIZE[t.dtype]
                       for t in header.tensors.values()), i
    assert not failures, f"{len(failures)} inputs raised a non-HeaderError, e.g. (iteration, error): {failures[:5]}"
    assert sum(outcomes.values()) == FUZZ_N
    if FUZZ_N >= 3000:
        # The mutations reach deep into the parser: valid files and most rules are hit.
        assert outcomes["accepted"] > 0
        assert len(outcomes) >= 12, outcomes
