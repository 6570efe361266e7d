"""Tests of ``dcp_safetensors.layout``: sizes, names, byte runs, tiling checks, and whole-checkpoint plans.

The main property test plays DCP: random tensors sharded over random device meshes
with random DTensor placements, replicated chunks deduplicated, ``plan_layout``
called, and every file assembled from what each rank is told to write. The files
must be byte-identical to ``safetensors.torch.save_file`` of the full tensors.
"""

from __future__ import annotations

import math
import os
import pkgutil
import random
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

import dcp_safetensors
from dcp_safetensors import layout as layout_package
from dcp_safetensors.errors import ConfigurationError, LayoutError
from dcp_safetensors.format import DTYPE_ITEMSIZE, parse_header
from dcp_safetensors.layout import (
    MODEL_GROUP,
    CheckpointLayout,
    ChunkSpec,
    Extents,
    TensorSpec,
    check_tiling,
    chunk_extents,
    chunk_table,
    file_names,
    natural_key,
    parse_size,
    plan_layout,
)
from dcp_safetensors.layout.files import MIN_SPLIT_FILE, plan_files, split_limit
from dcp_safetensors.layout.geometry import chunk_extent_arrays
from dcp_safetensors.layout.tiling import _check_by_sweep

META = {"format": "pt"}
TRAINING = "training_state/state"

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}


# --------------------------------------------------------------------------------------------
# Purity: the layout imports no torch
# --------------------------------------------------------------------------------------------

PURE_MODULES = [
    "dcp_safetensors.format",
    "dcp_safetensors.layout",
    *(f"dcp_safetensors.layout.{m.name}" for m in pkgutil.iter_modules(layout_package.__path__)),
]

# Imports one module in a fresh interpreter with its parent packages stubbed out (their
# __init__ would run instead: dcp_safetensors' imports the torch-facing API), then names
# every torch module loaded.
PURITY_PROBE = """
import importlib, sys, types
root, name = sys.argv[1], sys.argv[2]
parts = name.split(".")
for i in range(1, len(parts)):
    package = ".".join(parts[:i])
    stub = types.ModuleType(package)
    stub.__path__ = [root + "/" + "/".join(parts[1:i])]
    sys.modules[package] = stub
importlib.import_module(name)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_every_layout_module_is_checked_for_purity() -> None:
    assert {"geometry", "tiling", "files", "parts", "plan"} <= {m.rsplit(".", 1)[-1] for m in PURE_MODULES}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_module_imports_no_torch(module) -> None:
    """format and every layout module stay pure: no torch, let alone torch.distributed."""
    root = os.path.dirname(dcp_safetensors.__file__)
    out = subprocess.run(
        [sys.executable, "-c", PURITY_PROBE, root, module], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"


# --------------------------------------------------------------------------------------------
# parse_size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, 1),
        (1000, 1000),
        (5 * 10**9, 5 * 10**9),
        ("123", 123),
        ("7B", 7),
        ("7b", 7),  # a bare b is bytes: there is no decimal unit for it to turn into bits
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("500MB", 500 * 10**6),
        ("2MiB", 2 * 2**20),
        ("100KB", 100 * 10**3),
        ("10KiB", 10 * 2**10),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("5GIB", 5 * 2**30),
        ("5gib", 5 * 2**30),  # binary units are bytes whatever the case
        ("5GB ", 5 * 10**9),
        (" 5 GB", 5 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("1.005KB", 1005),  # exact decimal arithmetic, not float (1.005 * 1000 = 1004.99...)
        ("0.5KiB", 512),
        # transformers: a lower-case b after a decimal unit means bits.
        ("8Mb", 10**6),
        ("8mb", 10**6),
        ("5gb", 5 * 10**9 // 8),
        ("5Gb", 5 * 10**9 // 8),
        ("8kb", 1000),
        ("5gB", 5 * 10**9),  # upper-case B: bytes
        ("1" * 30 + "GB", int("1" * 30) * 10**9),
    ],
)
def test_parse_size(size, expected) -> None:
    assert parse_size(size) == expected
    assert type(parse_size(size)) is int


@pytest.mark.parametrize(
    "size",
    [
        "abc",
        "",
        "   ",
        "-5GB",
        "GB",
        "5GBB",
        "5 G B",
        "1e9",
        "5K",  # the unit pattern allows these three: they used to escape as KeyError
        "5i",
        "5GI",
        "0GB",
        "0.1b",  # rounds down to 0 bytes
        "0.0001KB",
        0,
        -1,
        1.5,
        True,
        False,
        None,
        [5],
    ],
)
def test_parse_size_rejects(size) -> None:
    with pytest.raises(ConfigurationError, match="max_shard_size"):
        parse_size(size)


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_size("abc")


# --------------------------------------------------------------------------------------------
# natural_key, file_names
# --------------------------------------------------------------------------------------------


def test_natural_key_orders_numbers_numerically() -> None:
    names = ["layers.10.w", "layers.2.w", "embed", "layers.1.w", "layers.2.b", "lm_head", "layers.100.w"]
    assert sorted(names, key=natural_key) == [
        "embed",
        "layers.1.w",
        "layers.2.b",
        "layers.2.w",
        "layers.10.w",
        "layers.100.w",
        "lm_head",
    ]
    assert natural_key("x007.y") == ((1, "x"), (0, 7), (1, ".y"))
    assert natural_key("") == ()


def test_natural_key_compares_digits_against_letters_without_error() -> None:
    names = ["a", "a1", "ab", "1", "1a", "10", "2", "", "a.1", "a.b", "é2", "é10"]
    ordered = sorted(names, key=natural_key)
    assert ordered == ["", "1", "1a", "2", "10", "a", "a1", "a.1", "a.b", "ab", "é2", "é10"]


def test_file_names() -> None:
    assert file_names("model", 1) == ["model.safetensors"]
    assert file_names("model", 3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert file_names(TRAINING, 2) == [
        "training_state/state-00001-of-00002.safetensors",
        "training_state/state-00002-of-00002.safetensors",
    ]
    assert file_names("model", 100000)[-1] == "model-100000-of-100000.safetensors"


# --------------------------------------------------------------------------------------------
# chunk_extents
# --------------------------------------------------------------------------------------------


def test_chunk_runs_shard0_is_one_run() -> None:
    runs = chunk_extents((4, 6), 4, (2, 0), (2, 6), base=100)
    assert runs == Extents(148, 48)
    assert runs.offsets().tolist() == [148] and runs.nbytes == 48 and runs.count == 1


def test_chunk_runs_shard1_is_one_run_per_row() -> None:
    runs = chunk_extents((4, 6), 4, (0, 3), (4, 3))
    assert runs == Extents(12, 12, (4,), (24,))
    assert runs.offsets().tolist() == [12, 36, 60, 84]
    assert runs.nbytes == 48


def test_chunk_runs_3d_middle_dim_shard() -> None:
    # shape (2, 6, 5), bf16: rows of 5 elements, Shard(1) in 2 of 3 pieces.
    runs = chunk_extents((2, 6, 5), 2, (0, 2, 0), (2, 3, 5), base=8)
    assert runs == Extents(8 + 20, 30, (2,), (60,))
    assert runs.offsets().tolist() == [28, 88]


def test_chunk_runs_single_index_outer_dims_are_dropped() -> None:
    runs = chunk_extents((4, 6, 5), 2, (1, 2, 0), (1, 3, 5))
    assert runs == Extents((1 * 30 + 2 * 5) * 2, 30)
    runs = chunk_extents((2, 3, 4), 1, (1, 1, 2), (1, 2, 2))
    assert runs == Extents(18, 2, (2,), (4,))
    assert runs.offsets().tolist() == [18, 22]


def test_chunk_runs_two_outer_dims() -> None:
    runs = chunk_extents((3, 4, 5), 1, (1, 1, 1), (2, 2, 3))
    assert runs == Extents(20 + 5 + 1, 3, (2, 2), (20, 5))
    assert runs.offsets().tolist() == [26, 31, 46, 51]


def test_chunk_runs_0dim_and_full() -> None:
    assert chunk_extents((), 8, (), (), base=16) == Extents(16, 8)
    assert chunk_extents((3, 4), 2, (0, 0), (3, 4), base=5) == Extents(5, 24)


def test_chunk_runs_zero_size() -> None:
    for shape, offsets, sizes in [((4, 0), (0, 0), (4, 0)), ((4, 6), (4, 0), (0, 6)), ((0,), (0,), (0,))]:
        runs = chunk_extents(shape, 4, offsets, sizes, base=64)
        assert runs.nbytes == 0 and runs.count == 0
        assert runs.offsets().tolist() == []


@st.composite
def boxes(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    offsets, sizes = [], []
    for d in shape:
        o = draw(st.integers(0, d))
        offsets.append(o)
        sizes.append(draw(st.integers(0, d - o)))
    return shape, tuple(offsets), tuple(sizes), draw(st.sampled_from([1, 2, 4, 8])), draw(st.integers(0, 50))


@settings(max_examples=200, deadline=None)
@given(boxes())
def test_chunk_runs_gather_the_box(box) -> None:
    """Reading the runs out of the full tensor's bytes gives the box's row-major bytes."""
    shape, offsets, sizes, itemsize, base = box
    full = np.arange(math.prod(shape) * itemsize, dtype=np.int64).reshape(shape + (itemsize,))
    file = np.concatenate([np.full(base, -1, dtype=np.int64), full.reshape(-1)])
    expected = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].reshape(-1)
    runs = chunk_extents(shape, itemsize, offsets, sizes, base)
    assert runs.nbytes == expected.size
    gathered = [file[o : o + runs.length] for o in runs.offsets().tolist()]
    assert all(len(g) == runs.length for g in gathered)
    got = np.concatenate(gathered) if gathered else np.zeros(0, dtype=np.int64)
    assert got.tolist() == expected.tolist()
    # Extents are maximal: no run ends where the next begins (those would be one run).
    starts = runs.offsets().tolist()
    assert all(a + runs.length < b for a, b in zip(starts, starts[1:]))


@st.composite
def box_sets(draw):
    """Random boxes (any overlap, empty ones included) of one random shape, held by random ranks."""
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    chunks = []
    for _ in range(draw(st.integers(0, 6))):
        offsets = [draw(st.integers(0, d)) for d in shape]
        sizes = [draw(st.integers(0, d - o)) for o, d in zip(offsets, shape, strict=True)]
        chunks.append(C(draw(st.integers(0, 3)), offsets, sizes))
    return shape, chunks, draw(st.sampled_from([1, 2, 4, 8])), draw(st.integers(0, 50))


@settings(max_examples=200, deadline=None)
@given(box_sets())
def test_chunk_run_arrays_are_chunk_runs_of_every_chunk(case) -> None:
    """The vectorized runs (the planner's) are exactly the per-chunk runs (the reader's and writer's)."""
    shape, chunks, itemsize, base = case
    expected = sorted(
        (start, runs.length, c.rank)
        for c in chunks
        for runs in [chunk_extents(shape, itemsize, c.offsets, c.sizes, base)]
        for start in runs.offsets().tolist()
        if runs.length
    )
    table = chunk_table(chunks).get("w")
    got = [] if table is None else sorted(zip(*(a.tolist() for a in chunk_extent_arrays(shape, itemsize, table, base))))
    assert got == expected


# --------------------------------------------------------------------------------------------
# check_tiling: the grid check on tables and lists, and the sweep it falls back to
# --------------------------------------------------------------------------------------------


def chunk_writes(layout, rank: int) -> list:
    """What ``rank`` writes of its own chunks, as the writer asks its RankWritePlan for each."""
    plan = layout.rank_plans[rank]
    mine = [c for key, arrays in layout.chunks.items() for c in arrays.specs(key) if c.rank == rank]
    return [w for c in mine if (w := plan.chunk_write(c.key, c.offsets, c.sizes)) is not None]


def spec(shape, key="w", dtype="F32") -> TensorSpec:
    return TensorSpec(key, key, dtype, tuple(shape))


def C(rank, offsets, sizes, key="w") -> ChunkSpec:
    return ChunkSpec(rank, key, tuple(offsets), tuple(sizes))


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [
        ((4, 4), [C(0, (0, 0), (2, 2)), C(1, (0, 2), (2, 2)), C(2, (2, 0), (2, 2)), C(3, (2, 2), (2, 2))]),
        ((5,), [C(0, (0,), (2,)), C(1, (2,), (2,)), C(2, (4,), (1,)), C(3, (5,), (0,))]),  # torch.chunk: empty last
        ((1, 4), [C(0, (0, 0), (1, 4)), C(1, (1, 0), (0, 4)), C(2, (1, 0), (0, 4))]),
        ((), [C(3, (), ())]),
        ((0, 3), []),
        ((0, 3), [C(0, (0, 0), (0, 3)), C(1, (0, 0), (0, 3))]),
        ((3, 5), [C(0, (0, 0), (3, 5))]),
        ((2, 3, 4), [C(r, (r // 3, r % 3, 0), (1, 1, 4)) for r in range(6)]),
        ((4, 6), [C(0, (0, 0), (4, 1)), C(1, (0, 1), (4, 5))]),
        # An irregular (non-grid) tiling is still an exact tiling.
        ((4, 4), [C(0, (0, 0), (1, 4)), C(1, (1, 0), (3, 1)), C(2, (1, 1), (3, 3))]),
    ],
)
def test_check_tiling_accepts_exact_tilings(shape, chunks) -> None:
    for order in (chunks, list(reversed(chunks))):
        _check_by_sweep(spec(shape), order)
        check_tiling(spec(shape), order)
        check_tiling(spec(shape), chunk_table(order).get("w"))


REJECTED_CHUNKS = [
        (
            "overlap",
            (4, 4),
            [C(0, (0, 0), (3, 4)), C(1, (2, 0), (2, 4))],
            [r"overlaps", r"rank 0 chunk offsets=\[0, 0\] sizes=\[3, 4\]", r"rank 1 chunk offsets=\[2, 0\]"],
        ),
        (
            "overlap-equal-to-hole",  # volumes add up to numel: only the overlap check can tell
            (4, 4),
            [C(0, (0, 0), (2, 4)), C(1, (1, 0), (2, 4))],
            [r"overlaps", r"rank 0", r"rank 1"],
        ),
        (
            "overlap-across-the-sweep-dim",
            (4, 4),
            [C(0, (0, 0), (4, 1)), C(1, (0, 1), (4, 1)), C(2, (0, 2), (4, 2)), C(5, (1, 0), (1, 3))],
            [r"overlaps", r"rank 5 chunk offsets=\[1, 0\] sizes=\[1, 3\]"],
        ),
        (
            "duplicate-chunk",  # a replicated chunk DCP failed to dedup
            (4,),
            [C(0, (0,), (4,)), C(7, (0,), (4,))],
            [r"overlaps", r"rank 0", r"rank 7"],
        ),
        (
            "overlap-on-a-grid-of-as-many-cells",  # only the grid's one-cell-per-chunk check sees it
            (4,),
            [C(0, (0,), (3,)), C(1, (2,), (2,)), C(2, (3,), (1,))],
            [r"rank 0 chunk offsets=\[0\] sizes=\[3\] overlaps rank 1 chunk offsets=\[2\] sizes=\[2\]"],
        ),
        (
            "duplicate-cell-and-an-empty-one",  # as many cells as chunks, but two chunks share one
            (3,),
            [C(0, (0,), (1,)), C(1, (0,), (1,)), C(2, (2,), (1,))],
            [r"overlaps", r"rank 0 chunk offsets=\[0\] sizes=\[1\]", r"rank 1 chunk offsets=\[0\] sizes=\[1\]"],
        ),
        (
            "hole",
            (4, 4),
            [C(0, (0, 0), (2, 4)), C(2, (2, 0), (1, 4))],
            [r"ranks \[0, 2\] cover 12 of 16 elements", r"shape \[4, 4\]"],
        ),
        ("no-chunks", (2,), [], [r"ranks \[\] cover 0 of 2 elements"]),
        (
            "out-of-bounds",
            (4, 4),
            [C(0, (0, 0), (2, 4)), C(3, (2, 0), (3, 4))],
            [r"rank 3 chunk offsets=\[2, 0\] sizes=\[3, 4\] lies outside the global shape \[4, 4\]"],
        ),
        (
            "out-of-bounds-past-the-end",  # a cell of its own beyond the end: only the bounds check sees it
            (4,),
            [C(0, (0,), (4,)), C(1, (4,), (1,))],
            [r"rank 1 chunk offsets=\[4\] sizes=\[1\] lies outside the global shape \[4\]"],
        ),
        (
            "out-of-bounds-before-the-start",
            (4,),
            [C(1, (-1,), (1,)), C(0, (0,), (4,))],
            [r"rank 1 chunk offsets=\[-1\] sizes=\[1\] lies outside"],
        ),
        (
            "negative-offset",
            (4,),
            [C(1, (-1,), (2,)), C(0, (1,), (3,))],
            [r"rank 1 chunk offsets=\[-1\] sizes=\[2\] lies outside"],
        ),
        (
            "negative-size",
            (4,),
            [C(0, (0,), (4,)), C(1, (2,), (-2,))],
            [r"rank 1 chunk offsets=\[2\] sizes=\[-2\] lies outside"],
        ),
        (
            "wrong-ndim",
            (4, 4),
            [C(0, (0, 0), (2, 4)), C(6, (2,), (2,))],
            [r"rank 6 chunk offsets=\[2\] sizes=\[2\] does not have the tensor's 2 dims"],
        ),
        (
            "wrong-ndim-every-chunk",  # a table of 1-D chunks for a 2-D tensor
            (4, 4),
            [C(0, (0,), (4,))],
            [r"rank 0 chunk offsets=\[0\] sizes=\[4\] does not have the tensor's 2 dims"],
        ),
        (
            "wrong-ndim-sizes-only",
            (4, 4),
            [C(4, (0, 0), (4, 4, 1))],
            [r"rank 4 .* does not have the tensor's 2 dims"],
        ),
        (
            "two-writers-of-a-0-dim-tensor",
            (),
            [C(3, (), ()), C(0, (), ())],
            [r"a 0-dim tensor needs exactly one writer, got ranks \[0, 3\]"],
        ),
        ("no-writer-of-a-0-dim-tensor", (), [], [r"needs exactly one writer, got ranks \[\]"]),
]


@pytest.mark.parametrize(
    ("name", "shape", "chunks", "patterns"), [pytest.param(*c, id=c[0]) for c in REJECTED_CHUNKS]
)
def test_check_tiling_rejects_chunk_lists(name, shape, chunks, patterns) -> None:
    """A list of chunks, of any dims, gets the same verdict and message from check_tiling as from the sweep."""
    for order in (chunks, list(reversed(chunks))):
        with pytest.raises(LayoutError, match=r"^tensor 'w': ") as info:
            _check_by_sweep(spec(shape), order)
        for pattern in patterns:
            assert re.search(pattern, str(info.value)), (pattern, str(info.value))
        with pytest.raises(LayoutError) as listed:
            check_tiling(spec(shape), order)
        assert str(listed.value) == str(info.value)


@pytest.mark.parametrize(
    ("name", "shape", "chunks", "patterns"), [pytest.param(*c, id=c[0]) for c in REJECTED_CHUNKS]
)
def test_check_tiling_rejects(name, shape, chunks, patterns) -> None:
    """The fast path (a grid of cells) must refuse every rejected table; the sweep it falls back to names the fault."""
    for order in (chunks, list(reversed(chunks))):
        if len({len(c.offsets) for c in order} | {len(c.sizes) for c in order}) > 1:
            # Chunks of mixed dims fit in no table: chunk_table refuses them before any check.
            with pytest.raises(LayoutError, match=r"^tensor 'w': chunks with \[\d+, \d+\] dims"):
                chunk_table(order)
            continue
        with pytest.raises(LayoutError, match=r"^tensor 'w': ") as info:
            check_tiling(spec(shape), chunk_table(order).get("w"))
        for pattern in patterns:
            assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@st.composite
def grid_chunks(draw):
    """The cells of a random grid over a random shape, then maybe spoiled: a cell dropped, doubled, moved or grown."""
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    cuts = [sorted({0, d, *draw(st.lists(st.integers(0, d), max_size=3))}) for d in shape]
    cells = [[]]
    for c in cuts:
        cells = [cell + [(a, b)] for cell in cells for a, b in zip(c, c[1:])]
    chunks = [C(r, [a for a, _ in cell], [b - a for a, b in cell]) for r, cell in enumerate(cells)]
    if chunks and draw(st.booleans()):
        i = draw(st.integers(0, len(chunks) - 1))
        d = draw(st.integers(0, len(shape) - 1))
        offsets, sizes = list(chunks[i].offsets), list(chunks[i].sizes)
        spoil = draw(st.sampled_from(["drop", "double", "move", "grow"]))
        if spoil == "drop":
            del chunks[i]
        elif spoil == "double":
            chunks.append(C(len(chunks), offsets, sizes))
        elif spoil == "move":
            offsets[d] += draw(st.integers(-1, 1))
            chunks[i] = C(i, offsets, sizes)
        else:
            sizes[d] += draw(st.integers(-1, 1))
            chunks[i] = C(i, offsets, sizes)
    return shape, draw(st.permutations(chunks))


@settings(max_examples=300, deadline=None)
@given(grid_chunks())
def test_check_tiling_agrees_with_the_sweep(case) -> None:
    """The grid check only ever accepts what the sweep accepts; everything else gets the sweep's own message."""
    shape, chunks = case
    outcomes = []
    for check in (
        lambda: _check_by_sweep(spec(shape), chunks),
        lambda: check_tiling(spec(shape), chunks),
        lambda: check_tiling(spec(shape), chunk_table(chunks).get("w")),
    ):
        try:
            check()
            outcomes.append(None)
        except LayoutError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1] == outcomes[2]


# --------------------------------------------------------------------------------------------
# DTensor-like sharding (torch.distributed.tensor semantics) and DCP's dedup
# --------------------------------------------------------------------------------------------


def shard_piece(size: int, pieces: int, index: int) -> tuple[int, int]:
    """torch.chunk's split of ``size`` into ``pieces``: (offset, length); empty pieces may trail."""
    full = -(-size // pieces)
    start = full * index
    if start >= size:
        return size, 0
    return start, min(size, start + full) - start


def local_box(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coord: tuple[int, ...], placements: tuple
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the chunk at mesh ``coord``; placements: None (Replicate) or a tensor dim.

    Several mesh dims sharding one tensor dim nest in mesh-dim order; an empty
    chunk sits at the end of the dim (offset = dim size), as DTensor reports it.
    """
    offsets = [0] * len(shape)
    sizes = list(shape)
    for mesh_dim, dim in enumerate(placements):
        if dim is None:
            continue
        if sizes[dim] == 0:
            offsets[dim] = shape[dim]
            continue
        o, n = shard_piece(sizes[dim], mesh_shape[mesh_dim], coord[mesh_dim])
        offsets[dim] = offsets[dim] + o if n else shape[dim]
        sizes[dim] = n
    return tuple(offsets), tuple(sizes)


def test_local_box_matches_torch() -> None:
    cases = [
        ((5, 3), (2, 3), (Shard(0), Shard(0))),
        ((7, 4), (2, 2, 2), (Shard(1), Replicate(), Shard(0))),
        ((1, 4), (4,), (Shard(0),)),
        ((3, 0, 2), (2, 4), (Shard(1), Shard(2))),
        ((6,), (2, 2, 2), (Shard(0), Shard(0), Shard(0))),
    ]
    for shape, mesh_shape, placements in cases:
        dims = tuple(p.dim if isinstance(p, Shard) else None for p in placements)
        for coord in np.ndindex(*mesh_shape):
            sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
            assert local_box(shape, mesh_shape, coord, dims) == (tuple(offsets), tuple(sizes))


@dataclass
class Case:
    specs: list[TensorSpec]
    placements: dict[str, tuple]
    mesh_shape: tuple[int, ...]
    chunks: list[ChunkSpec]
    max_shard_size: int
    seed: int

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh_shape)


SUFFIXES = ["weight", "bias", "norm", "q_proj.weight", "experts.3.w"]


@st.composite
def cases(draw, groups=(MODEL_GROUP, MODEL_GROUP, TRAINING)):
    mesh_shape: list[int] = []
    for _ in range(draw(st.integers(1, 3))):
        mesh_shape.append(draw(st.integers(1, 8 // math.prod(mesh_shape))))
    mesh = tuple(mesh_shape)
    n = draw(st.integers(1, 8))
    names = draw(
        st.lists(
            st.tuples(st.integers(0, 12), st.sampled_from(SUFFIXES)),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    specs, placements = [], {}
    for i, (layer, suffix) in enumerate(names):
        dtype = draw(st.sampled_from(sorted(DTYPE_ITEMSIZE)))
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=4)))
        group = draw(st.sampled_from(groups))
        name = f"layers.{layer}.{suffix}" if group == MODEL_GROUP else f"optim.{layer}.{suffix}.exp_avg"
        key = f"k{i}:{name}"
        specs.append(TensorSpec(key, name, dtype, shape, group))
        placements[key] = tuple(
            draw(st.one_of(st.none(), st.integers(0, len(shape) - 1))) if shape else None for _ in mesh
        )
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    # Every rank's chunk of every tensor; identical chunks (replicas) deduplicated as DCP does.
    holders: dict[tuple, list[int]] = defaultdict(list)
    for rank, coord in enumerate(np.ndindex(*mesh)):
        for s in specs:
            offsets, sizes = local_box(s.shape, mesh, coord, placements[s.key])
            holders[s.key, offsets, sizes].append(rank)
    chunks = [ChunkSpec(rng.choice(ranks), key, o, sz) for (key, o, sz), ranks in holders.items()]
    rng.shuffle(chunks)
    total = sum(s.nbytes for s in specs)
    # Small enough that most checkpoints span several files; sometimes below the largest tensor.
    fraction = draw(st.sampled_from([0.0, 0.1, 0.25, 0.4, 0.6, 1.0]))
    max_shard_size = max(1, int(total * fraction)) + draw(st.integers(0, 16))
    return Case(specs, placements, mesh, chunks, max_shard_size, seed)


def full_tensors(case: Case) -> dict[str, np.ndarray]:
    """Random bytes for each full tensor, as uint8 arrays of shape ``shape + (itemsize,)``."""
    rng = np.random.default_rng(case.seed)
    out = {}
    for s in case.specs:
        raw = rng.integers(0, 256, size=s.nbytes, dtype=np.uint8)
        if s.dtype == "BOOL":
            raw &= 1
        out[s.key] = raw.reshape(s.shape + (DTYPE_ITEMSIZE[s.dtype],))
    return out


def box_bytes(full: np.ndarray, offsets, sizes) -> np.ndarray:
    return np.ascontiguousarray(full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]).reshape(-1)


def as_torch(full: np.ndarray, s: TensorSpec) -> torch.Tensor:
    if s.nbytes == 0:
        return torch.empty(s.shape, dtype=TORCH_DTYPES[s.dtype])
    return torch.from_numpy(full.reshape(-1).copy()).view(TORCH_DTYPES[s.dtype]).reshape(s.shape)


def assemble(layout: CheckpointLayout, case: Case, full: dict[str, np.ndarray]):
    """Every file as written from the rank plans' headers and chunks, with a per-byte write count."""
    sizes_of = {(c.rank, c.key, c.offsets): c.sizes for c in case.chunks if c.numel}
    data = {f.name: np.zeros(f.size, dtype=np.uint8) for f in layout.files}
    cover = {f.name: np.zeros(f.size, dtype=np.int32) for f in layout.files}
    header_writers: dict[str, list[int]] = defaultdict(list)
    written: Counter = Counter()
    for rank, plan in layout.rank_plans.items():
        for h in plan.headers:
            data[h.file][: len(h.data)] = np.frombuffer(h.data, dtype=np.uint8)
            cover[h.file][: len(h.data)] += 1
            header_writers[h.file].append(rank)
        for w in chunk_writes(layout, rank):
            written[rank, w.key, w.offsets] += 1
            chunk = box_bytes(full[w.key], w.offsets, sizes_of[rank, w.key, w.offsets])
            assert chunk.size == w.extents.nbytes
            starts = w.extents.offsets()
            assert starts.size == w.extents.count
            index = (starts[:, None] + np.arange(w.extents.length, dtype=np.int64)[None, :]).reshape(-1)
            data[w.file][index] = chunk
            np.add.at(cover[w.file], index, 1)
    # Each rank is told to write exactly its own non-empty chunks, once each.
    assert written == Counter(sizes_of.keys())
    return data, cover, header_writers


# --------------------------------------------------------------------------------------------
# The main property: plan_layout against DCP-like inputs, byte for byte against save_file
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(cases())
def test_plan_layout_writes_save_file_bytes(case: Case) -> None:
    # The chunks are DTensor's: check local_box against torch's own computation.
    torch_placements = {k: tuple(Replicate() if d is None else Shard(d) for d in p) for k, p in case.placements.items()}
    for coord in np.ndindex(*case.mesh_shape):
        for s in case.specs:
            sizes, offsets = _compute_local_shape_and_global_offset(
                s.shape, case.mesh_shape, list(coord), torch_placements[s.key]
            )
            assert local_box(s.shape, case.mesh_shape, coord, case.placements[s.key]) == (offsets, sizes)

    layout = plan_layout(case.specs, case.chunks, max_shard_size=case.max_shard_size, metadata=META)
    assert layout.tensors == tuple(case.specs)
    assert set(layout.rank_plans) <= set(range(case.world_size))
    full = full_tensors(case)
    data, cover, header_writers = assemble(layout, case, full)
    spec_of = {(s.group, s.name): s for s in case.specs}
    groups = sorted({s.group for s in case.specs})

    # Files per group: HF names, in natural order of their tensors, within max_shard_size.
    assert [f.group for f in layout.files] == sorted(f.group for f in layout.files)
    for group in groups:
        files = [f for f in layout.files if f.group == group]
        assert [f.name for f in files] == file_names(group, len(files))
        keys = [sorted(natural_key(e.name) for e in f.entries) for f in files]
        for a, b in zip(keys, keys[1:]):
            assert a[-1] < b[0]
    for f in layout.files:
        assert f.entries, f.name
        assert f.data_size <= case.max_shard_size or len(f.entries) == 1

    with tempfile.TemporaryDirectory() as tmp:
        for f in layout.files:
            blob = data[f.name].tobytes()
            # Every byte of every file written exactly once; one header write per file.
            assert cover[f.name].min(initial=1) == 1 and cover[f.name].max(initial=1) == 1, f.name
            assert len(header_writers[f.name]) == 1
            if f.data_size:  # the header goes with the rank holding the first data byte
                first = [
                    r for r, p in layout.rank_plans.items()
                    for w in chunk_writes(layout, r) if w.file == f.name and int(w.extents.offsets()[0]) == f.data_start
                ]
                assert header_writers[f.name] == first
            # A valid safetensors file holding exactly the full tensors.
            parsed = parse_header(blob, len(blob), source=f.name)
            assert parsed.metadata == META
            assert parsed.data_start == f.data_start and len(blob) == f.size
            assert parsed.tensors == {e.name: e for e in f.entries}
            tensors = {}
            for e in f.entries:
                s = spec_of[f.group, e.name]
                assert (e.dtype, e.shape, e.nbytes) == (s.dtype, s.shape, s.nbytes)
                assert blob[f.data_start + e.begin : f.data_start + e.end] == full[s.key].tobytes()
                tensors[e.name] = as_torch(full[s.key], s)
            # Byte-identical to what safetensors writes for the same tensors.
            path = Path(tmp) / "reference.safetensors"
            safetensors.torch.save_file(tensors, str(path), metadata=META)
            assert path.read_bytes() == blob, f.name

    # Index data: each tensor of a group in exactly one file of that group.
    for group in (MODEL_GROUP, TRAINING):
        members = [s for s in case.specs if s.group == group]
        weight_map = layout.weight_map(group)
        assert sorted(weight_map) == sorted(s.name for s in members)
        for name, file in weight_map.items():
            (owner,) = [f for f in layout.files if any(e.name == name for e in f.entries)
                        and f.group == group]
            assert owner.name == file
        assert layout.total_size(group) == sum(s.nbytes for s in members)
    assert sum(len(f.entries) for f in layout.files) == len(case.specs)


@settings(max_examples=100, deadline=None)
@given(
    cases(),
    st.sampled_from([1, 1, 7, 64, 500]),
    st.one_of(st.none(), st.integers(1, 4000)),
    st.integers(1, 3000),
)
def test_plan_layout_parts_and_transfers_deliver_every_byte(case: Case, min_part, max_part, budget) -> None:
    """Parts tile each file; with the transfer rounds, each part's writer ends up with exactly its bytes."""
    if max_part is not None:
        max_part = max(max_part, min_part)
    layout = plan_layout(
        case.specs,
        case.chunks,
        max_shard_size=case.max_shard_size,
        metadata=META,
        min_part=min_part,
        max_part=max_part,
        transfer_budget=budget,
        world_size=case.world_size,
    )
    assert set(layout.rank_plans) == set(range(case.world_size))
    sizes_of = {(c.rank, c.key, c.offsets): c.sizes for c in case.chunks if c.numel}
    size_of = {f.name: f.size for f in layout.files}
    # What each rank holds: its chunks' runs and the headers it was given.
    held = {r: {f: np.zeros(n, dtype=bool) for f, n in size_of.items()} for r in layout.rank_plans}
    for r, plan in layout.rank_plans.items():
        for h in plan.headers:
            held[r][h.file][: len(h.data)] = True
        for w in chunk_writes(layout, r):
            assert (r, w.key, w.offsets) in sizes_of
            for o in w.extents.offsets().tolist():
                held[r][w.file][o : o + w.extents.length] = True
    # Parts: numbered 1..n, tiling each file, at least min_part but the last, each in its writer's plan.
    writer = {f: np.full(n, -1, dtype=np.int64) for f, n in size_of.items()}
    parts_of = defaultdict(list)
    for r, plan in layout.rank_plans.items():
        for p in plan.parts:
            assert p.rank == r
            parts_of[p.file].append(p)
    for f, n in size_of.items():
        parts = sorted(parts_of[f], key=lambda p: p.number)
        assert [p.number for p in parts] == list(range(1, len(parts) + 1))
        assert parts[0].start == 0 and parts[-1].end == n
        for a, b in zip(parts, parts[1:]):
            assert a.end == b.start and a.end - a.start >= min_part
        for p in parts:
            assert p.end > p.start
            writer[f][p.start : p.end] = p.rank
    # Rounds: every rank runs the same number; each round's sends are its receives.
    rounds = {len(p.rounds) for p in layout.rank_plans.values()}
    assert len(rounds) == 1
    received = {f: np.zeros(n, dtype=np.int32) for f, n in size_of.items()}
    for i in range(rounds.pop()):
        sends, recvs = Counter(), Counter()
        for r, plan in layout.rank_plans.items():
            rnd = plan.rounds[i]
            assert all(t.src == r for t in rnd.sends) and all(t.dst == r for t in rnd.recvs)
            assert sum(t.length for t in rnd.sends) <= budget
            assert sum(t.length for t in rnd.recvs) <= budget
            sends.update(rnd.sends)
            recvs.update(rnd.recvs)
        assert sends == recvs
        for t in sends.elements():
            lo, hi = t.offset, t.offset + t.length
            assert t.length > 0 and t.src != t.dst
            assert held[t.src][t.file][lo:hi].all()  # the sender has these bytes
            assert (writer[t.file][lo:hi] == t.dst).all()  # the receiver writes them
            received[t.file][lo:hi] += 1
    # Each byte reaches its writer exactly once: held by it, or received once.
    for f in size_of:
        mine = np.zeros(size_of[f], dtype=np.int32)
        for r in layout.rank_plans:
            mine += held[r][f] & (writer[f] == r)
        assert ((mine + received[f]) == 1).all(), f


def in_place_writes(layout: CheckpointLayout, case: Case, full: dict[str, np.ndarray], rank: int) -> list:
    """``(file, extents, bytes)`` of what ``rank`` writes under an in-place plan: headers, its chunks outside
    the row exchange, and its row blocks, the exchange simulated with every rank's chunk bytes."""
    plan = layout.rank_plans[rank]
    out = [(h.file, Extents(0, len(h.data)), np.frombuffer(h.data, dtype=np.uint8)) for h in plan.headers]
    exchanged = plan.row_chunks()
    sizes_of = {(c.rank, c.key, c.offsets): c.sizes for c in case.chunks if c.numel}
    for w in chunk_writes(layout, rank):
        if (w.key, w.offsets) not in exchanged:
            data = box_bytes(full[w.key], w.offsets, sizes_of[rank, w.key, w.offsets])
            out.append((w.file, w.extents, data))
    for rnd in plan.row_rounds:
        for slab in rnd:
            chunk_of = {r: box_bytes(full[slab.key], o, sizes_of[r, slab.key, o]) for r, o in zip(slab.ranks, slab.offsets)}
            me = slab.ranks.index(rank)
            received = {r: slab.sends(i, chunk_of[r])[rank] for i, r in enumerate(slab.ranks) if r != rank}
            offset, block = slab.block(me, chunk_of[rank], received)
            if block.size:  # a slab of fewer rows than members leaves some without a block
                out.append((slab.file, Extents(offset, block.size), block))
    return out


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from([1 << 30, 64, 7]), st.sampled_from([1 << 16, 17]))
def test_in_place_plans_write_every_byte_once_with_row_blocks(case: Case, budget: int, small_run: int) -> None:
    """POSIX plans: the same files, headers and tensor places as planned parts, no parts; the writes of every
    rank (in place, and row blocks after the simulated exchange) cover every file exactly once with the bytes
    the parts plan gives (checked against save_file by the property above), and each rank's bytes per file
    are what the commit checks (``in_place_bytes``). Rounds: the same count for every rank, within budget."""
    parts = plan_layout(case.specs, case.chunks, max_shard_size=case.max_shard_size, metadata=META,
                        world_size=case.world_size)
    layout = plan_layout(case.specs, case.chunks, max_shard_size=case.max_shard_size, metadata=META,
                         world_size=case.world_size, in_place=True, transfer_budget=budget, small_run=small_run)
    assert layout.files == parts.files and set(layout.rank_plans) == set(parts.rank_plans)
    full = full_tensors(case)
    reference, _, _ = assemble(parts, case, full)
    data = {f.name: np.zeros(f.size, dtype=np.uint8) for f in layout.files}
    cover = {f.name: np.zeros(f.size, dtype=np.int32) for f in layout.files}
    written: Counter = Counter()
    size_of = {f.name: f.size for f in layout.files}
    assert len({len(p.row_rounds) for p in layout.rank_plans.values()}) == 1
    for r, plan in layout.rank_plans.items():
        assert plan.in_place and not plan.parts and not plan.rounds
        assert plan.headers == parts.rank_plans[r].headers  # the header goes with the file's first data byte
        assert dict(plan.tensors) == dict(parts.rank_plans[r].tensors)
        for rnd in plan.row_rounds:
            assert all(r in slab.ranks for slab in rnd)
            sent = 0
            for slab in rnd:
                me = slab.ranks.index(r)
                sent += sum((b - a) * slab.widths[me] for i, (a, b) in enumerate(slab.blocks()) if i != me)
            assert sent <= budget or len(rnd) == 1
        for file, extents, chunk in in_place_writes(layout, case, full, r):
            index = (extents.offsets()[:, None] + np.arange(extents.length, dtype=np.int64)[None, :]).reshape(-1)
            data[file][index] = chunk
            np.add.at(cover[file], index, 1)
            written[r, file] += chunk.size
        assert dict(plan.file_sizes) == {name: size_of[name] for (w, name) in written if w == r}
    for f in layout.files:
        assert (cover[f.name] == 1).all(), f.name
        assert (data[f.name] == reference[f.name]).all(), f.name
    assert dict(layout.in_place_bytes) == dict(written)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 64), st.sampled_from([MODEL_GROUP, TRAINING])), min_size=1, max_size=40),
    st.integers(1, 12),
    st.sampled_from([5 * 10**9, 100 << 20, 40 << 20]),
)
def test_min_files_cuts_each_group_into_that_many_files(sizes, min_files: int, max_bytes: int) -> None:
    """Tensors of 1-64 MiB (their specs only): every tensor in one file, none over its limit unless alone, and at
    least ``min_files`` files per group wherever its tensors fit the split and the files stay >= 16 MiB."""
    specs = [TensorSpec(f"k{i}", f"layers.{i}.w", "F32", (mib << 18,), group) for i, (mib, group) in enumerate(sizes)]
    files = plan_files(specs, max_bytes, META, min_files)
    placed = Counter((f.group, e.name) for f in files for e in f.entries)
    assert placed == Counter((s.group, s.name) for s in specs)
    for group in {s.group for s in specs}:
        members = [s for s in specs if s.group == group]
        total = sum(s.nbytes for s in members)
        limit = split_limit(total, max_bytes, min_files)
        assert limit <= max_bytes and (limit >= MIN_SPLIT_FILE or limit == max_bytes)
        in_group = [f for f in files if f.group == group]
        assert all(sum(e.nbytes for e in f.entries) <= limit or len(f.entries) == 1 for f in in_group)
        if min_files == 1:
            assert in_group == [f for f in plan_files(specs, max_bytes, META) if f.group == group]
        elif total >= min_files * MIN_SPLIT_FILE and max(s.nbytes for s in members) <= -(-total // min_files):
            assert len(in_group) >= min_files, (len(in_group), total, limit)


def test_in_place_ranks_write_files_starting_at_another_one() -> None:
    """Every rank holds a row slice of every tensor (FSDP): rank r writes file r (mod 3) first, then on in turn,
    so no two of 3 ranks start on one file; parts plans have no order to give (their ranks write parts)."""
    specs = [TensorSpec(f"k{i}", f"layers.{i}.w", "F32", (8, 4)) for i in range(3)]
    chunks = [ChunkSpec(r, s.key, (2 * r, 0), (2, 4)) for s in specs for r in range(4)]
    layout = plan_layout(specs, chunks, max_shard_size=128, metadata=META, in_place=True, world_size=4)
    names = [f.name for f in layout.files]
    assert len(names) == 3
    for r, plan in layout.rank_plans.items():
        assert list(plan.file_sizes) == [names[(r + i) % 3] for i in range(3)], r
    assert layout.rank_plans[0].file_sizes[names[0]] == layout.files[0].size


def test_in_place_plan_of_no_tensors_has_no_files_to_write() -> None:
    """A save of non-tensor values only (a step counter) plans no file and gives every rank an empty plan."""
    layout = plan_layout([], [], max_shard_size=100, metadata=META, in_place=True, world_size=3)
    assert layout.files == () and sorted(layout.rank_plans) == [0, 1, 2]
    assert all(not p.file_sizes and not p.headers for p in layout.rank_plans.values())


def test_in_place_plans_need_storage_that_takes_any_run() -> None:
    with pytest.raises(ConfigurationError, match="min_part 1"):
        plan_layout([spec((4,))], [C(0, (0,), (4,))], max_shard_size=100, metadata=META, min_part=5, in_place=True)


# --------------------------------------------------------------------------------------------
# Groups and plan_layout's LayoutErrors
# --------------------------------------------------------------------------------------------


def test_groups_get_separate_files_and_weight_maps() -> None:
    specs = [
        TensorSpec("model.layers.0.w", "layers.0.w", "F32", (4, 4)),
        TensorSpec("model.layers.1.w", "layers.1.w", "F32", (4, 4)),
        TensorSpec("model.head", "head", "BF16", (8,)),
        TensorSpec("optim.state.layers.0.w.exp_avg", "layers.0.w", "F32", (4, 4), TRAINING),
        TensorSpec("optim.state.layers.1.w.exp_avg", "layers.1.w.exp_avg", "F32", (4, 4), TRAINING),
        TensorSpec("optim.state.step", "step", "I64", (), TRAINING),
    ]
    chunks = [ChunkSpec(r, s.key, (2 * r, 0), (2, 4)) for s in specs if s.shape == (4, 4) for r in (0, 1)]
    chunks += [ChunkSpec(1, "model.head", (0,), (8,)), ChunkSpec(0, "optim.state.step", (), ())]
    layout = plan_layout(specs, chunks, max_shard_size=72, metadata=META)
    assert [(f.name, [e.name for e in f.entries]) for f in layout.files] == [
        ("model-00001-of-00003.safetensors", ["head"]),
        ("model-00002-of-00003.safetensors", ["layers.0.w"]),
        ("model-00003-of-00003.safetensors", ["layers.1.w"]),
        ("training_state/state-00001-of-00002.safetensors", ["layers.0.w"]),
        ("training_state/state-00002-of-00002.safetensors", ["step", "layers.1.w.exp_avg"]),
    ]
    # The same name in two groups is two tensors, in two files.
    assert layout.weight_map() == {
        "head": "model-00001-of-00003.safetensors",
        "layers.0.w": "model-00002-of-00003.safetensors",
        "layers.1.w": "model-00003-of-00003.safetensors",
    }
    assert layout.weight_map(TRAINING) == {
        "layers.0.w": "training_state/state-00001-of-00002.safetensors",
        "layers.1.w.exp_avg": "training_state/state-00002-of-00002.safetensors",
        "step": "training_state/state-00002-of-00002.safetensors",
    }
    assert layout.total_size() == 64 + 64 + 16
    assert layout.total_size(TRAINING) == 64 + 64 + 8
    # Chunks of the optimizer's layers.0.w go to the training-state file, not the model's.
    files_of = {(r, w.key): w.file for r in layout.rank_plans for w in chunk_writes(layout, r)}
    assert files_of[0, "optim.state.layers.0.w.exp_avg"] == "training_state/state-00001-of-00002.safetensors"
    assert files_of[0, "model.layers.0.w"] == "model-00002-of-00003.safetensors"
    # Within a file, save_file's order: wider dtypes first, then by name.
    last = layout.files[-1]
    assert [e.name for e in last.entries] == ["step", "layers.1.w.exp_avg"]
    assert [(e.begin, e.end) for e in last.entries] == [(0, 8), (8, 72)]


def test_one_file_when_everything_fits() -> None:
    specs = [TensorSpec(f"k{i}", f"layers.{i}.w", "F16", (3,)) for i in (10, 2, 1)]
    chunks = [ChunkSpec(0, s.key, (0,), (3,)) for s in specs]
    layout = plan_layout(specs, chunks, max_shard_size="5GB", metadata=META)
    assert [f.name for f in layout.files] == ["model.safetensors"]
    assert [e.name for e in layout.files[0].entries] == ["layers.1.w", "layers.10.w", "layers.2.w"]
    assert layout.weight_map(TRAINING) == {} and layout.total_size(TRAINING) == 0


def test_two_keys_with_one_name_in_a_group() -> None:
    specs = [
        TensorSpec("model.a.weight", "a.weight", "F32", (2,)),
        TensorSpec("_orig_mod.a.weight", "a.weight", "F32", (2,)),
    ]
    chunks = [ChunkSpec(0, s.key, (0,), (2,)) for s in specs]
    with pytest.raises(LayoutError, match=r"keys 'model.a.weight' and '_orig_mod.a.weight' both map to 'a.weight'"):
        plan_layout(specs, chunks, max_shard_size=100, metadata=META)
    # The same name in different groups is fine.
    specs[1] = TensorSpec("_orig_mod.a.weight", "a.weight", "F32", (2,), TRAINING)
    assert len(plan_layout(specs, chunks, max_shard_size=100, metadata=META).files) == 2


def test_chunk_for_an_undeclared_tensor() -> None:
    specs = [TensorSpec("w", "w", "F32", (2,))]
    chunks = [ChunkSpec(0, "w", (0,), (2,)), ChunkSpec(3, "ghost", (0,), (2,))]
    with pytest.raises(LayoutError, match=r"rank 3 chunk offsets=\[0\] sizes=\[2\] names tensor 'ghost', which no plan"):
        plan_layout(specs, chunks, max_shard_size=100, metadata=META)


def test_plan_layout_other_layout_errors() -> None:
    w = TensorSpec("w", "w", "F32", (4,))
    with pytest.raises(LayoutError, match=r"tensor 'w' is listed twice"):
        plan_layout([w, w], [ChunkSpec(0, "w", (0,), (4,))], max_shard_size=100, metadata=META)
    with pytest.raises(LayoutError, match=r"tensor 'x': dtype 'F128' has no safetensors equivalent"):
        plan_layout([TensorSpec("x", "x", "F128", (1,))], [], max_shard_size=100, metadata=META)
    with pytest.raises(LayoutError, match=r"tensor 'w': .*rank 0.*overlaps.*rank 1"):
        plan_layout([w], [ChunkSpec(0, "w", (0,), (3,)), ChunkSpec(1, "w", (2,), (2,))], max_shard_size=100,
                    metadata=META)
    with pytest.raises(LayoutError, match=r"tensor 'w': chunks from ranks \[1\] cover 2 of 4"):
        plan_layout([w], [ChunkSpec(1, "w", (2,), (2,))], max_shard_size=100, metadata=META)
    with pytest.raises(ConfigurationError):
        plan_layout([w], [ChunkSpec(0, "w", (0,), (4,))], max_shard_size="lots", metadata=META)
