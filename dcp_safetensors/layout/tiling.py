"""The proof that a tensor's chunks cover it exactly once, before any byte is written.

Owns :func:`check_tiling`, the one entry point: in bounds, no overlap, no
hole, or a :class:`LayoutError` naming the chunks at fault. Two proofs
behind it: the chunks DTensor makes are the cells of a grid, which a
vectorized check proves in O(k log k) (:func:`_grid_tiles`); chunks off any
grid, and every failure (to name the culprits), take a sweep over the most
sharded dim (:func:`_check_by_sweep`), linear for ``Shard(0)``/``Shard(1)``.

Example:
    >>> s = TensorSpec("w", "w", "F32", (4,))
    >>> check_tiling(s, [ChunkSpec(0, "w", (0,), (2,)), ChunkSpec(1, "w", (2,), (2,))])
    >>> check_tiling(s, [ChunkSpec(0, "w", (0,), (3,)), ChunkSpec(1, "w", (2,), (2,))])
    Traceback (most recent call last):
    dcp_safetensors.errors.LayoutError: tensor 'w': rank 0 chunk offsets=[0] sizes=[3] overlaps rank 1 chunk offsets=[2] sizes=[2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dcp_safetensors.errors import LayoutError
from dcp_safetensors.layout.geometry import ChunkArrays, ChunkSpec, TensorSpec, describe

__all__ = ["check_tiling"]


def check_tiling(spec: TensorSpec, chunks: ChunkArrays | Sequence[ChunkSpec] | None) -> None:
    """Raise :class:`LayoutError` unless ``chunks`` cover ``spec`` exactly once; vectorized.

    ``chunks`` is the tensor's :class:`ChunkArrays` (an entry of
    :func:`chunk_table`), a sequence of :class:`ChunkSpec`, or ``None`` for
    none. The chunks DTensor makes (any mesh, ``Shard``/``_StridedShard``,
    uneven sizes) are the cells of a grid: each dim is cut at every chunk
    boundary, and each chunk is exactly one cell. Then the chunks tile the
    tensor iff they are in bounds, no two share a cell and every cell has one:
    O(k log k) with numpy, no pairwise test. Chunks off any grid, and a
    failing check (to name the chunks at fault), take the sweep.

    Example:
        >>> from dcp_safetensors.layout import chunk_table
        >>> s = TensorSpec("w", "w", "F32", (4, 4))
        >>> check_tiling(s, chunk_table([ChunkSpec(r, "w", (2 * (r // 2), 2 * (r % 2)), (2, 2)) for r in range(4)])["w"])
        >>> check_tiling(s, chunk_table([ChunkSpec(r, "w", (2 * (r // 2), 0), (2, 4)) for r in range(3)])["w"])
        Traceback (most recent call last):
        dcp_safetensors.errors.LayoutError: tensor 'w': rank 0 chunk offsets=[0, 0] sizes=[2, 4] overlaps rank 1 chunk offsets=[0, 0] sizes=[2, 4]
    """
    if isinstance(chunks, ChunkArrays):
        if not _grid_tiles_table(spec, chunks):
            _check_by_sweep(spec, chunks.specs(spec.key))
        return
    listed = list(chunks or ())
    arrays = _arrays_of(spec, listed)
    if arrays is None or not _grid_tiles_table(spec, arrays):
        _check_by_sweep(spec, listed)


def _grid_tiles_table(spec: TensorSpec, chunks: ChunkArrays) -> bool:
    """:func:`_grid_tiles` where it applies: some chunks, of the tensor's dims, not 0-dim."""
    ndim = len(spec.shape)
    return bool(len(chunks.ranks)) and ndim > 0 and chunks.offsets.shape[1] == ndim and _grid_tiles(spec.shape, chunks.offsets, chunks.sizes)


def _arrays_of(spec: TensorSpec, chunks: Sequence[ChunkSpec]) -> ChunkArrays | None:
    """``chunks`` as columns for the grid check; ``None`` if one lacks the tensor's dims (the sweep says which)."""
    ndim = len(spec.shape)
    if not chunks or any(len(c.offsets) != ndim or len(c.sizes) != ndim for c in chunks):
        return None
    return ChunkArrays(
        np.asarray([c.rank for c in chunks], dtype=np.int64),
        np.asarray([c.offsets for c in chunks], dtype=np.int64).reshape(len(chunks), ndim),
        np.asarray([c.sizes for c in chunks], dtype=np.int64).reshape(len(chunks), ndim),
    )


def _check_by_sweep(spec: TensorSpec, chunks: Sequence[ChunkSpec]) -> None:
    """:func:`check_tiling` for any chunks, naming the first chunk at fault.

    In bounds, pairwise disjoint, and volumes summing to ``numel`` together
    mean an exact tiling. Disjointness is checked by sweeping the dim with the
    most distinct chunk offsets (the sharded one), so only chunks that share
    that dim's interval are compared: linear for ``Shard(0)``/``Shard(1)``.

    Example:
        >>> _check_by_sweep(TensorSpec("w", "w", "F32", (4, 4)), [ChunkSpec(0, "w", (0, 0), (1, 4)),
        ...     ChunkSpec(1, "w", (1, 0), (3, 1)), ChunkSpec(2, "w", (1, 1), (3, 3))])  # no grid, still a tiling
    """
    live = _live_chunks(spec, chunks)
    if not spec.shape:
        if len(live) != 1:
            ranks = sorted(c.rank for c in live)
            raise LayoutError(
                f"tensor {spec.key!r}: a 0-dim tensor needs exactly one writer, got ranks {ranks}"
            )
        return
    _check_disjoint(spec, live)
    numel = math.prod(spec.shape)
    covered = sum(c.numel for c in live)
    if covered != numel:
        raise LayoutError(
            f"tensor {spec.key!r}: chunks from ranks {sorted({c.rank for c in live})} cover {covered} "
            f"of {numel} elements of shape {list(spec.shape)} (a rank's shard is missing from the plan)"
        )


def _live_chunks(spec: TensorSpec, chunks: Sequence[ChunkSpec]) -> list[ChunkSpec]:
    """The non-empty ``chunks``; raises for the first one without the tensor's dims or out of its bounds."""
    ndim = len(spec.shape)
    live = []
    for c in chunks:
        if len(c.offsets) != ndim or len(c.sizes) != ndim:
            raise LayoutError(f"tensor {spec.key!r}: {describe(c)} does not have the tensor's {ndim} dims")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, spec.shape, strict=False)):
            raise LayoutError(
                f"tensor {spec.key!r}: {describe(c)} lies outside the global shape {list(spec.shape)}"
            )
        if c.numel:
            live.append(c)
    return live


def _check_disjoint(spec: TensorSpec, live: Sequence[ChunkSpec]) -> None:
    """Raise for the first two of ``live`` (non-empty, in bounds) that overlap, sweeping the most sharded dim."""
    if not live:
        return
    ndim = len(spec.shape)
    dim = max(range(ndim), key=lambda d: len({c.offsets[d] for c in live}))
    active: list[ChunkSpec] = []
    for c in sorted(live, key=lambda c: c.offsets[dim]):
        active = [a for a in active if a.offsets[dim] + a.sizes[dim] > c.offsets[dim]]
        for a in active:
            if all(
                a.offsets[d] < c.offsets[d] + c.sizes[d] and c.offsets[d] < a.offsets[d] + a.sizes[d]
                for d in range(ndim)
            ):
                raise LayoutError(f"tensor {spec.key!r}: {describe(a)} overlaps {describe(c)}")
        active.append(c)


def _grid_tiles(shape: tuple[int, ...], offsets: np.ndarray, sizes: np.ndarray) -> bool:
    """True if the boxes are in bounds and are exactly the cells of the grid their boundaries cut."""
    dims = np.asarray(shape, dtype=np.int64)
    ends = offsets + sizes
    if (offsets < 0).any() or (sizes < 0).any() or (ends > dims).any():
        return False
    live = sizes.prod(axis=1) > 0
    if not math.prod(shape):
        return not live.any()
    offsets, ends = offsets[live], ends[live]
    cells = np.zeros(len(offsets), dtype=np.int64)
    grid = 1
    for d in range(len(shape)):
        cuts = np.unique(np.concatenate([offsets[:, d], ends[:, d], [0, shape[d]]]))
        lo = np.searchsorted(cuts, offsets[:, d])
        if (np.searchsorted(cuts, ends[:, d]) - lo != 1).any():
            return False  # a chunk spans several cells: not a grid, check pairwise
        grid *= len(cuts) - 1
        if grid > len(offsets):
            return False  # more cells than chunks: a hole (or an overlap)
        cells = cells * (len(cuts) - 1) + lo
    return grid == len(offsets) and len(np.unique(cells)) == grid
