"""Column shards written as row blocks: ranks swap columns so each writes whole rows.

A column shard (``Shard(1)`` of a weight under TP, ``Shard(2)`` of fused
experts) is one byte run per row. When the runs are short (under
:data:`SMALL_RUN`) a rank writing them in place pays a ``pwrite`` per run
(65,536 for one rank of a ``[8, 4096, 1024]`` bf16 expert tensor on ep 2 x
tp 2). The chunks whose boxes differ only in their last partial dim form a
*group* whose union is one contiguous byte range of the file; cut into
slabs of whole rows (each under the exchange budget), every member writes
one block of each slab's rows: it sends the others their rows of its
columns (one contiguous slice of its chunk each) and receives its rows of
theirs. Planned per group and slab, never per row: O(chunks).

Pure: numpy, no file or tensor. The writer runs the exchange
(:func:`~dcp_safetensors.collectives.exchange_rows`) on the pieces
:meth:`RowSlab.sends` cuts and assembles each block with :meth:`RowSlab.block`.

Example:
    >>> from dcp_safetensors.layout.geometry import TensorLocation, chunk_table, ChunkSpec
    >>> table = chunk_table([ChunkSpec(r, "w", (0, 2 * r), (4, 2)) for r in (0, 1)])  # Shard(1) of (4, 4)
    >>> (slab,), mine = plan_row_slabs(TensorLocation("f", 100, "F32", (4, 4)), table["w"], "w", budget=1 << 20)
    >>> slab.start, slab.rows, slab.row_bytes, slab.ranks, slab.blocks(), mine.tolist()
    (100, 4, 16, (0, 1), [(0, 2), (2, 4)], [True, True])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dcp_safetensors.layout.geometry import ChunkArrays, TensorLocation, chunk_extents

__all__ = ["SMALL_RUN", "RowSlab", "plan_row_slabs", "plan_row_rounds"]

SMALL_RUN = 2 << 10
"""Column shards with runs shorter than this are exchanged into row blocks by default.

Measured on CPU ranks with gloo (docs/benchmarks.md, "2-D and 3-D layouts"):
a ``pwrite`` costs about 2.5 us per run, and the exchange about as much per
2 KiB. Runs of 1 KiB (ep 2 x tp 2 experts) saved 0.23 s -> 0.16 s swapped; runs of
4 KiB saved 0.11 s -> 0.17 s. ``SafetensorsWriter(row_exchange_below=...)``
sets it (higher where the exchange is cheap, e.g. NCCL over NVLink)."""


@dataclass(frozen=True)
class RowSlab:
    """Rows ``[first_row, first_row + rows)`` of a group of column chunks, written as one block per member.

    ``start`` is the file offset of the slab's first byte; each row is
    ``row_bytes`` long, member ``i`` (rank ``ranks[i]``, holding the chunk
    at ``offsets[i]``) holds bytes ``[columns[i], columns[i] + widths[i])``
    of every row, and writes rows ``blocks()[i]`` (relative to the slab).
    """

    key: str
    file: str
    start: int
    first_row: int
    rows: int
    row_bytes: int
    ranks: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]
    columns: tuple[int, ...]
    widths: tuple[int, ...]

    def blocks(self) -> list[tuple[int, int]]:
        """``(first, end)`` rows of the slab each member writes: equal shares, in member order."""
        k = len(self.ranks)
        return [(i * self.rows // k, (i + 1) * self.rows // k) for i in range(k)]

    def sends(self, member: int, chunk: np.ndarray) -> dict[int, np.ndarray]:
        """What ``member`` sends each other member: its columns of their rows (a contiguous slice of its chunk).

        ``chunk`` is the member's whole chunk as uint8, rows x its width.
        """
        width = self.widths[member]
        out = {}
        for i, (a, b) in enumerate(self.blocks()):
            if i != member:
                lo, hi = (self.first_row + a) * width, (self.first_row + b) * width
                out[self.ranks[i]] = chunk[lo:hi]
        return out

    def block(self, member: int, chunk: np.ndarray, received: Mapping[int, np.ndarray]) -> tuple[int, np.ndarray]:
        """``(file offset, bytes)`` of the block ``member`` writes, from its chunk and the others' pieces.

        ``received`` maps each other member's rank to what it sent (:meth:`sends`).
        """
        a, b = self.blocks()[member]
        block = np.empty((b - a, self.row_bytes), dtype=np.uint8)
        for i, rank in enumerate(self.ranks):
            col, width = self.columns[i], self.widths[i]
            if i == member:
                piece = chunk[(self.first_row + a) * width : (self.first_row + b) * width]
            else:
                piece = received[rank]
            block[:, col : col + width] = piece.reshape(b - a, width)
        return self.start + a * self.row_bytes, block.reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def traffic(self) -> list[tuple[int, int, int]]:
        """``(rank, bytes sent, bytes received)`` of each member in this slab's exchange."""
        out = []
        for i, (a, b) in enumerate(self.blocks()):
            rows = b - a
            out.append((self.ranks[i], (self.rows - rows) * self.widths[i], rows * (self.row_bytes - self.widths[i])))
        return out


def plan_row_slabs(
    place: TensorLocation, chunks: ChunkArrays, key: str, *, budget: int, small_run: int = SMALL_RUN
) -> tuple[list[RowSlab], np.ndarray]:
    """The row slabs of one tensor's short-run column chunks, and which chunks they take (a mask over ``chunks``).

    A group is the chunks (two or more) whose boxes agree on every dim before
    their last partial dim, tile that dim between them, and span every dim
    after it, where the group's union is one contiguous range of the file and
    each chunk's runs are shorter than ``small_run``. Each group is cut into
    slabs of at most ``budget`` bytes (at least one row each). Other chunks
    are written in place as they are.
    """
    shape, itemsize = place.shape, place.itemsize
    taken = np.zeros(len(chunks.ranks), dtype=bool)
    if len(shape) < 2 or not len(chunks.ranks):
        return [], taken
    sizes, offsets = chunks.sizes, chunks.offsets
    live = sizes.prod(axis=1) > 0
    partial = sizes != np.asarray(shape, dtype=np.int64)
    split = np.where(partial.any(axis=1), len(shape) - 1 - np.argmax(partial[:, ::-1], axis=1), -1)
    tail = [math.prod(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    run = np.where(split > 0, sizes[np.arange(len(sizes)), np.maximum(split, 0)] * np.asarray(tail)[np.maximum(split, 0)], 0)
    candidate = live & (split > 0) & (run < small_run)
    groups: dict[tuple, list[int]] = {}
    for i in np.flatnonzero(candidate).tolist():
        d = int(split[i])
        groups.setdefault((d, *offsets[i, :d].tolist(), *sizes[i, :d].tolist()), []).append(i)
    slabs: list[RowSlab] = []
    for (d, *lead), members in groups.items():
        members.sort(key=lambda i: int(offsets[i, d]))
        starts = [int(offsets[i, d]) for i in members]
        ends = [int(offsets[i, d] + sizes[i, d]) for i in members]
        ranks = [int(chunks.ranks[i]) for i in members]
        if len(members) < 2 or starts[0] != 0 or ends[-1] != shape[d] or starts[1:] != ends[:-1]:
            continue  # not one full row per member set (the tiling proof covers the rest)
        if len(set(ranks)) != len(ranks):
            continue  # a rank holding two column pieces of one row: pieces are found by rank
        box_offsets = (*lead[:d], *([0] * (len(shape) - d)))
        box_sizes = (*lead[d:], *shape[d:])
        union = chunk_extents(shape, itemsize, box_offsets, box_sizes, place.offset)
        if union.count != 1:
            continue  # rows of the union are not back to back: a block would not be one run
        rows = math.prod(box_sizes[:d])
        row_bytes = math.prod(shape[d:]) * itemsize
        step = max(1, budget // row_bytes)
        for first in range(0, rows, step):
            n = min(step, rows - first)
            slabs.append(RowSlab(
                key, place.file, union.start + first * row_bytes, first, n, row_bytes,
                tuple(ranks),
                tuple(tuple(offsets[i].tolist()) for i in members),
                tuple(s * tail[d] for s in starts),
                tuple(int(run[i]) for i in members),
            ))
        taken[members] = True
    return slabs, taken


def plan_row_rounds(slabs: list[RowSlab], budget: int) -> list[list[RowSlab]]:
    """Group slabs into exchange rounds in which no rank sends or receives more than ``budget`` bytes.

    A slab is at most ``budget`` bytes, so each fits a round of its own. Every
    rank runs every round, in this order.

    Example:
        >>> s = RowSlab("w", "f", 0, 0, 4, 16, (0, 1), ((0, 0), (0, 2)), (0, 8), (8, 8))
        >>> [len(r) for r in plan_row_rounds([s, s, s], budget=40)]
        [2, 1]
    """
    rounds: list[list[RowSlab]] = []
    sent: dict[int, int] = {}
    received: dict[int, int] = {}
    for slab in slabs:
        load = slab.traffic()
        if not rounds or any(sent.get(r, 0) + out > budget or received.get(r, 0) + inn > budget for r, out, inn in load):
            rounds.append([])
            sent.clear()
            received.clear()
        rounds[-1].append(slab)
        for r, out, inn in load:
            sent[r] = sent.get(r, 0) + out
            received[r] = received.get(r, 0) + inn
    return rounds
