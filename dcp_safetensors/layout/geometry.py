"""Tensors, their chunks, and where a chunk's bytes fall in a row-major tensor.

Owns the vocabulary the rest of :mod:`dcp_safetensors.layout` speaks:
:class:`TensorSpec` (a tensor of the checkpoint), :class:`ChunkSpec` (the box
one rank holds), :class:`ChunkArrays` and :func:`chunk_table` (every chunk of
a tensor as numpy columns, how thousands of ranks' chunks travel), and the
byte-run arithmetic: :func:`chunk_extents` turns a box of a row-major tensor into
:class:`Extents`, the fewest contiguous byte runs that hold it, and
:func:`chunk_extent_arrays` does the same for all of a tensor's chunks at once
(numpy; the planner's path for thousands of ranks). Nothing here knows about
files or ranks' writes.

Example:
    >>> chunk_extents((4, 6), 4, (0, 3), (4, 3), base=96)  # a Shard(1) half: one run per row
    Extents(start=108, length=12, counts=(4,), strides=(24,))
    >>> chunk_table([ChunkSpec(0, "w", (0,), (2,)), ChunkSpec(1, "w", (2,), (2,))])["w"].ranks.tolist()
    [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from dcp_safetensors.errors import LayoutError
from dcp_safetensors.format import DTYPE_ITEMSIZE, tensor_nbytes
from dcp_safetensors.names import MODEL_GROUP

__all__ = [
    "MODEL_GROUP",
    "TensorSpec",
    "ChunkSpec",
    "TensorLocation",
    "Extents",
    "ChunkArrays",
    "chunk_table",
    "chunk_extents",
    "chunk_extent_arrays",
    "row_major_strides",
    "describe",
]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the checkpoint: its DCP key, its name in the file, dtype, global shape.

    ``group`` is the file stem the tensor belongs to (``"model"`` for the HF
    files; another stem, e.g. ``"training_state/state"``, for tensors kept out
    of the weight map).
    """

    key: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    group: str = MODEL_GROUP

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class ChunkSpec:
    """The box ``[offsets, offsets + sizes)`` of tensor ``key`` that ``rank`` holds and writes."""

    rank: int
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def describe(c: ChunkSpec) -> str:
    """How error messages name a chunk: ``rank 1 chunk offsets=[2, 0] sizes=[2, 4]``."""
    return f"rank {c.rank} chunk offsets={list(c.offsets)} sizes={list(c.sizes)}"


@dataclass(frozen=True)
class Extents:
    """Where a chunk's bytes go: ``prod(counts)`` runs of ``length`` bytes.

    Run ``i`` (row-major over ``counts``) holds bytes ``[i*length, (i+1)*length)``
    of the chunk's contiguous row-major copy and starts at absolute file offset
    ``start + sum(idx[d] * strides[d])``. A chunk spanning every trailing dim
    (``Shard(0)``) is one run; a column shard (``Shard(1)``) one run per row.

    Example:
        >>> Extents(100, 8, (3,), (32,)).offsets().tolist()
        [100, 132, 164]
    """

    start: int
    length: int
    counts: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return math.prod(self.counts)

    @property
    def nbytes(self) -> int:
        return self.count * self.length

    def offsets(self) -> np.ndarray:
        """Absolute file offset of every run, in the chunk's byte order (int64 array)."""
        out = np.array([self.start], dtype=np.int64)
        for count, stride in zip(self.counts, self.strides, strict=False):
            out = (out[:, None] + np.arange(count, dtype=np.int64)[None, :] * stride).reshape(-1)
        return out


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes sit: ``file``, the absolute ``offset`` of its first byte, dtype name, shape.

    The one placement record: the planner gives each rank the locations of the
    tensors it writes, a read checkpoint the locations of every tensor.

    Example:
        >>> TensorLocation("model.safetensors", 96, "F32", (4, 6)).extents((0, 3), (4, 3))
        Extents(start=108, length=12, counts=(4,), strides=(24,))
    """

    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    def extents(self, offsets: Sequence[int], sizes: Sequence[int]) -> Extents:
        """The file extents of the box ``[offsets, offsets + sizes)`` of this tensor."""
        return chunk_extents(self.shape, self.itemsize, offsets, sizes, self.offset)


class ChunkArrays(NamedTuple):
    """Every chunk of one tensor, columnar: ``ranks`` ``(k,)``, ``offsets`` and ``sizes`` ``(k, ndim)`` (int64)."""

    ranks: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray

    def specs(self, key: str) -> list[ChunkSpec]:
        return [
            ChunkSpec(r, key, tuple(o), tuple(z))
            for r, o, z in zip(self.ranks.tolist(), self.offsets.tolist(), self.sizes.tolist(), strict=True)
        ]


def chunk_table(chunks: Iterable[ChunkSpec | tuple[int, str, Sequence[int], Sequence[int]]]) -> dict[str, ChunkArrays]:
    """Group chunks by tensor into :class:`ChunkArrays`.

    Accepts :class:`ChunkSpec` objects or ``(rank, key, offsets, sizes)``
    tuples; raises :class:`LayoutError` if one tensor's chunks disagree on
    their number of dims.

    Example:
        >>> t = chunk_table([ChunkSpec(0, "w", (0,), (2,)), ChunkSpec(1, "w", (2,), (2,))])
        >>> t["w"].ranks.tolist(), t["w"].offsets.tolist()
        ([0, 1], [[0], [2]])
    """
    grouped: dict[str, tuple[list[int], list[Sequence[int]], list[Sequence[int]]]] = {}
    for c in chunks:
        rank, key, offsets, sizes = (c.rank, c.key, c.offsets, c.sizes) if isinstance(c, ChunkSpec) else c
        g = grouped.get(key)
        if g is None:
            g = grouped[key] = ([], [], [])
        g[0].append(rank)
        g[1].append(offsets)
        g[2].append(sizes)
    table = {}
    for key, (ranks, offsets_of, sizes_of) in grouped.items():
        ndims = {len(o) for o in offsets_of} | {len(z) for z in sizes_of}
        if len(ndims) != 1:
            raise LayoutError(f"tensor {key!r}: chunks with {sorted(ndims)} dims; one tensor's chunks share its dims")
        ndim = ndims.pop()
        table[key] = ChunkArrays(
            np.asarray(ranks, dtype=np.int64),
            np.asarray(offsets_of, dtype=np.int64).reshape(len(ranks), ndim),
            np.asarray(sizes_of, dtype=np.int64).reshape(len(ranks), ndim),
        )
    return table


def row_major_strides(shape: Sequence[int]) -> list[int]:
    """Element strides of a contiguous row-major tensor of ``shape``.

    Example:
        >>> row_major_strides((2, 3, 4))
        [12, 4, 1]
    """
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def chunk_extents(
    shape: Sequence[int], itemsize: int, offsets: Sequence[int], sizes: Sequence[int], base: int = 0
) -> Extents:
    """The byte runs of the box ``[offsets, offsets + sizes)`` of a row-major tensor at ``base``.

    Example:
        >>> chunk_extents((4, 6), 4, (0, 3), (4, 3))  # a Shard(1) half: one run per row
        Extents(start=12, length=12, counts=(4,), strides=(24,))
        >>> chunk_extents((4, 6), 4, (2, 0), (2, 6))  # a Shard(0) half: one run
        Extents(start=48, length=48, counts=(), strides=())
    """
    if math.prod(sizes) == 0:
        return Extents(base, 0, (0,), (0,))
    strides = row_major_strides(shape)
    start = base + sum(o * s for o, s in zip(offsets, strides, strict=False)) * itemsize
    split = next((d for d in range(len(shape) - 1, -1, -1) if sizes[d] != shape[d]), -1)
    if split < 0:
        return Extents(start, math.prod(shape) * itemsize)
    length = sizes[split] * strides[split] * itemsize
    outer = [(sizes[d], strides[d] * itemsize) for d in range(split) if sizes[d] != 1]
    return Extents(start, length, tuple(c for c, _ in outer), tuple(s for _, s in outer))


def chunk_extent_arrays(
    shape: Sequence[int], itemsize: int, chunks: ChunkArrays, base: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`chunk_extents` of every non-empty chunk at once: ``(starts, lengths, ranks)`` of each run.

    A chunk whose dims before the last partial one are all 1 (``Shard(0)``,
    or a row of anything) is one run, computed with numpy for all such chunks
    together; the others (column shards) go through :func:`chunk_extents`. Extents
    come chunk by chunk, the single-run chunks first.

    Example:
        >>> t = chunk_table([ChunkSpec(0, "w", (0, 0), (2, 6)), ChunkSpec(1, "w", (2, 0), (2, 3)),
        ...                  ChunkSpec(2, "w", (2, 3), (2, 3))])
        >>> [a.tolist() for a in chunk_extent_arrays((4, 6), 4, t["w"], base=100)]
        [[100, 148, 172, 160, 184], [48, 12, 12, 12, 12], [0, 1, 1, 2, 2]]
    """
    dims = np.asarray(shape, dtype=np.int64)
    live = chunks.sizes.prod(axis=1) > 0
    offsets, sizes, owners = chunks.offsets[live], chunks.sizes[live], chunks.ranks[live]
    if not len(shape):
        return np.full(len(owners), base, dtype=np.int64), np.full(len(owners), itemsize, dtype=np.int64), owners
    strides = np.asarray(row_major_strides(shape), dtype=np.int64) * itemsize
    partial = sizes != dims
    ndim = len(shape)
    # The last dim a chunk does not span (-1: the whole tensor).
    split = np.where(partial.any(axis=1), ndim - 1 - np.argmax(partial[:, ::-1], axis=1), -1)
    outer_ones = np.logical_and.accumulate(np.concatenate([np.ones((len(sizes), 1), dtype=bool), sizes == 1], axis=1), axis=1)
    single = outer_ones[np.arange(len(sizes)), np.maximum(split, 0)] | (split <= 0)
    starts = base + offsets @ strides
    lengths = np.where(split >= 0, sizes[np.arange(len(sizes)), np.maximum(split, 0)] * strides[np.maximum(split, 0)], dims[0] * strides[0])
    if single.all():
        return starts, lengths, owners
    s_out, n_out, r_out = [starts[single]], [lengths[single]], [owners[single]]
    for i in np.flatnonzero(~single).tolist():
        runs = chunk_extents(shape, itemsize, offsets[i].tolist(), sizes[i].tolist(), base)
        at = runs.offsets()
        s_out.append(at)
        n_out.append(np.full(len(at), runs.length, dtype=np.int64))
        r_out.append(np.full(len(at), owners[i], dtype=np.int64))
    return np.concatenate(s_out), np.concatenate(n_out), np.concatenate(r_out)
