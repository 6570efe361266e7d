"""Block checksums: a CRC-32 per block of a file, so a load that reads a few byte ranges can check them.

A file's CRC-32 (:mod:`dcp_safetensors.checksum`) proves the whole file, but a
rank that loads only its shard never holds the whole file. So each file is
also cut into blocks of at most :data:`MAX_BLOCK` bytes, and each block's
CRC-32 is recorded. Blocks start at every cut the save gives
(:func:`plan_blocks`: each tensor's first byte, each end of a chunk a rank
wrote as one run), then every ``MAX_BLOCK`` bytes after it. A load with the
save's sharding then reads whole blocks only, with no extra byte; any other
load reads at most one partial block more at each end of a contiguous run
(:meth:`BlockTable.span`).

Writers report shares, not CRCs: a block is often written by several ranks
(a column shard has one run per row), and CRC-32 is affine, so each writer
sends, per block it touched, one number (:func:`block_shares`: the XOR of its
pieces' terms, each shifted to the block's end), and the coordinator folds
every writer's shares into the CRCs of the blocks (:func:`block_crcs`). A
file's CRC-32 follows from its blocks' (:func:`file_crc`).

Example:
    >>> import zlib
    >>> data = bytes(range(10)) * 3
    >>> starts = plan_blocks(len(data), cuts=[7], max_block=8)
    >>> starts.tolist()
    [0, 7, 15, 23]
    >>> ranks = [np.array([0, 12, 24]), np.array([6, 18])]  # two writers, runs of 6 bytes, interleaved
    >>> shares = [block_shares(starts, len(data), offs, 6, b"".join(data[o:o + 6] for o in offs)) for offs in ranks]
    >>> table = BlockTable(starts, block_crcs(starts, len(data), shares), len(data))
    >>> file_crc(table) == zlib.crc32(data), table.span(8, 9)
    (True, (7, 15))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from dcp_safetensors.checksum import (
    combine_run_arrays,
    crc32,
    format_crc32,
    shift_crcs,
    zeros_crc,
)
from dcp_safetensors.errors import CheckpointCorruptError, ChecksumMismatchError, LayoutError
from dcp_safetensors.layout import CheckpointLayout, Extents, TensorLocation

__all__ = [
    "MAX_BLOCK",
    "BlockShares",
    "BlockReport",
    "BlockTable",
    "band",
    "plan_blocks",
    "planned_starts",
    "tables_of",
    "block_shares",
    "block_crcs",
    "file_crc",
    "encode_tables",
    "decode_tables",
]

MAX_BLOCK = 1 << 20
"""The longest block. Blocks are cut at the save's chunk rows, so this bounds what a load with
another sharding reads beyond its bytes (one partial block per end of a run), what a column
shard's 2 MiB row spans (``LocalStorage.read_span``) read and copy twice (4 MiB blocks: a 2-D load
from tmpfs at 0.60x of an unchecked one; 1 MiB: 0.74-0.78x), and the record: 8 bytes per block, 8 MB per TB."""


def plan_blocks(size: int, cuts: Iterable[int], max_block: int = MAX_BLOCK) -> np.ndarray:
    """The first byte of every block of a ``size``-byte file: every cut in ``(0, size)``, then every
    ``max_block`` bytes after each (int64, ascending, from 0; empty for an empty file).

    Example:
        >>> plan_blocks(10, [4, 4, 12], max_block=3).tolist()
        [0, 3, 4, 7]
    """
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_block <= 0:
        raise ValueError(f"max_block must be positive, got {max_block}")
    given = np.asarray(cuts if isinstance(cuts, np.ndarray) else list(cuts), dtype=np.int64)
    segments = np.unique(np.concatenate([[0], given[(given > 0) & (given < size)]]))
    lengths = np.diff(np.append(segments, size))
    counts = -(-lengths // max_block)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(segments, counts) + within * max_block


def planned_starts(layout: CheckpointLayout, max_block: int = MAX_BLOCK) -> dict[str, np.ndarray]:
    """The first byte of every block of every file of a planned save: cut at the header's end and
    at the row bounds of every chunk (the whole tensor's ends for ``layout.whole_bands``), then every
    ``max_block`` bytes (:func:`plan_blocks`).

    Example:
        >>> from dcp_safetensors.layout import ChunkSpec, TensorSpec, plan_layout
        >>> layout = plan_layout([TensorSpec("w", "w", "F32", (4, 2))],
        ...                      [ChunkSpec(0, "w", (0, 0), (1, 2)), ChunkSpec(1, "w", (1, 0), (3, 2))],
        ...                      max_shard_size=100, metadata={})
        >>> planned_starts(layout)["model.safetensors"].tolist()  # the header, rank 0's row, rank 1's rows
        [0, 88, 96]
    """
    key_of = {(s.group, s.name): s.key for s in layout.tensors}
    out = {}
    for f in layout.files:
        cuts = [np.array([f.data_start], dtype=np.int64)]
        for e in f.entries:
            key = key_of[f.group, e.name]
            loc = TensorLocation(f.name, f.data_start + e.begin, e.dtype, e.shape)
            cuts.append(np.asarray(band(loc, None), dtype=np.int64))
            arrays = layout.chunks.get(key)
            if arrays is None or key in layout.whole_bands or not e.shape or not e.shape[0]:
                continue
            live = arrays.sizes.prod(axis=1) > 0
            rows = np.concatenate([arrays.offsets[live, 0], arrays.offsets[live, 0] + arrays.sizes[live, 0]])
            cuts.append(loc.offset + rows.astype(np.int64) * (loc.nbytes // e.shape[0]))
        out[f.name] = plan_blocks(f.size, np.concatenate(cuts), max_block)
    return out


def _lengths(starts: np.ndarray, size: int) -> np.ndarray:
    return np.diff(np.append(starts, size)).astype(np.int64)


class BlockShares(NamedTuple):
    """One writer's part in the CRCs of a file's blocks: ``shares[i]`` for block ``blocks[i]``."""

    blocks: np.ndarray
    shares: np.ndarray


def block_shares(starts: np.ndarray, size: int, offsets: Sequence[int] | np.ndarray, length: int, data: Any) -> BlockShares:
    """The shares of the runs one writer wrote into a file with blocks ``starts``: run ``i`` is
    ``length`` bytes at file offset ``offsets[i]``, held by ``data[i * length:(i + 1) * length]``
    (any buffer). Every byte is CRC'd once, in pieces cut at the block starts.

    Runs inside one block (a column shard's rows, mostly) are CRC'd in one tight loop and their
    terms computed with numpy: 8,192 rows of 8 KiB cost about what CRC-ing them does.

    Example:
        >>> import zlib
        >>> s = block_shares(np.array([0, 4]), 8, [2], 4, b"cdef")
        >>> s.blocks.tolist()
        [0, 1]
    """
    view = memoryview(data).cast("B")
    offsets = np.asarray(offsets, dtype=np.int64)
    if length <= 0 or not len(offsets):
        return BlockShares(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint32))
    ends = np.append(starts[1:], size)
    first = np.searchsorted(starts, offsets, side="right") - 1
    last = np.searchsorted(starts, offsets + length - 1, side="right") - 1
    inside = np.flatnonzero(first == last)
    blocks = [first[inside]]
    crcs = [np.fromiter((crc32(view[i * length : (i + 1) * length]) for i in inside.tolist()), np.uint32, len(inside))]
    lengths = [np.full(len(inside), length, dtype=np.int64)]
    after = [ends[first[inside]] - offsets[inside] - length]
    crossing: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for i in np.flatnonzero(first != last).tolist():  # runs cut by a block start: a piece per block
        offset = int(offsets[i])
        lo = offset
        for b in range(int(first[i]), int(last[i]) + 1):
            hi = min(int(ends[b]), offset + length)
            for column, value in zip(crossing, (b, crc32(view[i * length + lo - offset : i * length + hi - offset]), hi - lo, int(ends[b]) - hi), strict=True):
                column.append(value)
            lo = hi
    blocks.append(np.asarray(crossing[0], dtype=np.int64))
    crcs.append(np.asarray(crossing[1], dtype=np.uint32))
    lengths.append(np.asarray(crossing[2], dtype=np.int64))
    after.append(np.asarray(crossing[3], dtype=np.int64))
    ids, piece_lengths = np.concatenate(blocks), np.concatenate(lengths)
    terms = shift_crcs(np.concatenate(crcs) ^ zeros_crc(piece_lengths), np.concatenate(after))
    order = np.argsort(ids, kind="stable")
    ids, terms = ids[order], terms[order]
    unique, first_of = np.unique(ids, return_index=True)
    return BlockShares(unique, np.bitwise_xor.reduceat(terms, first_of).astype(np.uint32))


def block_crcs(starts: np.ndarray, size: int, shares: Iterable[BlockShares | tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The CRC-32 of every block, from the :func:`block_shares` of every writer of the file (uint32).

    The writers' runs must cover the file exactly once, which the save plan proves before a byte
    is written: a block nobody wrote reads as its zeros.
    """
    crcs = zeros_crc(_lengths(starts, size))
    for share in shares:
        np.bitwise_xor.at(crcs, np.asarray(share[0], dtype=np.int64), np.asarray(share[1], dtype=np.uint32))
    return crcs


def band(location: TensorLocation, rows: tuple[int, int] | None) -> tuple[int, int]:
    """The bytes of rows ``[rows[0], rows[1])`` of the tensor at ``location`` (all of it for ``None``
    or a 0-dim tensor): the segment whose blocks hold a chunk of those rows.

    The save cuts blocks at the row bounds of every chunk (:func:`plan_blocks`'s ``cuts``), so a
    writer finds the blocks its bytes fall in from its own chunk alone.

    Example:
        >>> band(TensorLocation("f", 100, "F32", (4, 2)), (1, 3))
        (108, 124)
    """
    end = location.offset + location.nbytes
    if rows is None or not location.shape or not location.shape[0]:
        return location.offset, end
    row = location.nbytes // location.shape[0]
    return location.offset + rows[0] * row, location.offset + rows[1] * row


@dataclass(frozen=True, eq=False)
class BlockReport:
    """What one writer sends the coordinator: ``(file index, block start, share)`` rows, the file
    index into ``files``; ``rank`` names the writer in errors."""

    files: tuple[str, ...]
    rows: np.ndarray
    rank: int = 0

    @classmethod
    def of(
        cls,
        writes: Iterable[tuple[str, tuple[int, int] | None, Extents, Any]],
        *,
        rank: int = 0,
        max_block: int = MAX_BLOCK,
        planned: Mapping[str, tuple[np.ndarray, int]] | None = None,
    ) -> BlockReport:
        """The shares of ``writes``: ``(file, segment, extents, data)``, the bytes ``data`` fill
        ``extents`` of ``file`` and lie in ``segment`` (``[start, end)``, :func:`band`), whose blocks
        start at its start and every ``max_block`` bytes after. A writer that holds the whole plan
        (convert) passes ``planned`` instead: ``{file: (block starts, size)}`` (:func:`planned_starts`).

        Example:
            >>> import zlib
            >>> r = BlockReport.of([("f", (0, 6), Extents(0, 6), b"abcdef")], max_block=4)
            >>> r.rows[:, 1].tolist()
            [0, 4]
            >>> table = tables_of({"f": np.array([0, 4])}, {"f": 6}, [r])["f"]
            >>> table.crcs.tolist() == [zlib.crc32(b"abcd"), zlib.crc32(b"ef")]
            True
        """
        files: dict[str, int] = {}
        rows = []
        for file, segment, extents, data in writes:
            if extents.nbytes == 0:
                continue
            if planned is not None:
                starts, end = planned[file]
            else:
                assert segment is not None
                starts, end = np.arange(segment[0], segment[1], max_block, dtype=np.int64), segment[1]
            shares = block_shares(starts, end, extents.offsets(), extents.length, data)
            index = files.setdefault(file, len(files))
            rows.append(np.stack([np.full(len(shares.blocks), index), starts[shares.blocks], shares.shares.astype(np.int64)], axis=1))
        return cls(tuple(files), np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64), rank)


def tables_of(starts: dict[str, np.ndarray], sizes: dict[str, int], reports: Iterable[BlockReport]) -> dict[str, BlockTable]:
    """Every file's :class:`BlockTable`, from the block starts the save planned (``starts``, per
    file of ``sizes``) and every writer's :class:`BlockReport`.

    Raises :class:`~dcp_safetensors.errors.LayoutError` for a share of a block the plan does not
    start (a writer that cut its blocks otherwise), naming the rank, file and byte.
    """
    shares: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in sizes}
    for report in reports:
        for i, name in enumerate(report.files):
            mine = report.rows[report.rows[:, 0] == i]
            planned = starts.get(name)
            if planned is None:
                raise LayoutError(f"rank {report.rank} reported block checksums of {name}, which this save does not write")
            at = np.searchsorted(planned, mine[:, 1])
            wrong = np.flatnonzero((at >= len(planned)) | (planned[np.minimum(at, len(planned) - 1)] != mine[:, 1]))
            if len(wrong):
                raise LayoutError(
                    f"{name}: rank {report.rank} reported a block at byte {int(mine[wrong[0], 1])}, where the plan starts "
                    "none; refusing to commit"
                )
            shares[name].append((at, mine[:, 2].astype(np.uint32)))
    return {name: BlockTable(starts[name], block_crcs(starts[name], size, shares[name]), size) for name, size in sizes.items()}


@dataclass(frozen=True, eq=False)
class BlockTable:
    """The blocks of one ``size``-byte file (``starts``, int64) and their CRC-32s (``crcs``, uint32)."""

    starts: np.ndarray
    crcs: np.ndarray
    size: int

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The bytes of the blocks that hold ``[start, end)``: what a checked read of it reads.

        Example:
            >>> BlockTable(np.array([0, 4, 8]), np.zeros(3, np.uint32), 10).span(5, 9)
            (4, 10)
        """
        if end <= start:
            return start, start
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, end - 1, side="right"))
        return int(self.starts[first]), int(self.starts[last]) if last < len(self.starts) else self.size

    def spans(self, limit: int) -> list[tuple[int, int]]:
        """The file as consecutive runs of whole blocks, each at most ``limit`` bytes unless one block is longer.

        Example:
            >>> BlockTable(np.array([0, 4, 8]), np.zeros(3, np.uint32), 10).spans(8)
            [(0, 8), (8, 10)]
        """
        bounds = np.append(self.starts, self.size).tolist()
        out: list[tuple[int, int]] = []
        lo = 0
        for i in range(1, len(bounds)):
            if bounds[i] - lo > limit and bounds[i - 1] > lo:
                out.append((lo, bounds[i - 1]))
                lo = bounds[i - 1]
        if self.size > lo:
            out.append((lo, self.size))
        return out

    def check(self, offset: int, data: Any, *, source: str, what: str | Callable[[int, int], str]) -> None:
        """Raise :class:`~dcp_safetensors.errors.ChecksumMismatchError` unless every block that lies
        wholly in ``data`` (the file's bytes from ``offset``) has its recorded CRC-32.

        ``source`` names the file in the message, ``what`` ends it: what fails, and what to do (or a
        function of the bad block's bytes ``(lo, hi)`` that says so).

        Example:
            >>> import zlib
            >>> table = BlockTable(np.array([0, 2]), np.array([zlib.crc32(b"ab"), zlib.crc32(b"cd")], np.uint32), 4)
            >>> table.check(0, b"abcd", source="f", what="restore it")
            >>> table.check(2, b"cx", source="f", what="restore it")
            Traceback (most recent call last):
            dcp_safetensors.errors.ChecksumMismatchError: f: bytes 2-4 (block 1 of 2) have checksum crc32:...
        """
        view = memoryview(data).cast("B")
        end = offset + len(view)
        first = int(np.searchsorted(self.starts, offset, side="left"))
        stop = int(np.searchsorted(self.starts, end, side="right"))
        # Only the blocks read: a column shard checks a few blocks per row, of files of thousands.
        bounds = [*self.starts[first:stop + 1].tolist(), self.size][: stop - first + 1]
        for b, lo, hi in zip(range(first, stop), bounds, bounds[1:], strict=False):
            if hi > end:
                break
            found = crc32(view[lo - offset : hi - offset])
            if found != int(self.crcs[b]):
                raise ChecksumMismatchError(
                    f"{source}: bytes {lo}-{hi} (block {b} of {len(self.starts)}) have checksum {format_crc32(found)}, "
                    f"the save recorded {format_crc32(int(self.crcs[b]))}: the file changed after it was written (a bad disk, copy or "
                    f"sync); {what(lo, hi) if callable(what) else what}"
                )


def file_crc(table: BlockTable) -> int:
    """The file's CRC-32, from its blocks' (what the index records for the whole file).

    Example:
        >>> import zlib
        >>> file_crc(BlockTable(np.array([0, 1]), np.array([zlib.crc32(b"a"), zlib.crc32(b"b")], np.uint32), 2)) == zlib.crc32(b"ab")
        True
    """
    return combine_run_arrays(_lengths(table.starts, table.size), table.crcs)


def encode_tables(tables: Sequence[BlockTable]) -> bytes:
    """The record of ``tables``, in order: per block, its length and CRC-32 as little-endian uint32.

    Example:
        >>> len(encode_tables([BlockTable(np.array([0, 4]), np.array([1, 2], np.uint32), 6)]))
        16
    """
    rows = [np.stack([_lengths(t.starts, t.size), t.crcs.astype(np.int64)], axis=1) for t in tables]
    return np.concatenate(rows or [np.zeros((0, 2), np.int64)]).astype("<u4").tobytes()


def decode_tables(data: bytes, files: Sequence[tuple[str, int, int]], *, source: str) -> dict[str, BlockTable]:
    """The tables of ``files`` (``(name, size, block count)``, in the record's order) from ``data``,
    checked: the counts add up to the record, and each file's block lengths to its size.

    Example:
        >>> t = decode_tables(encode_tables([BlockTable(np.array([0, 4]), np.array([1, 2], np.uint32), 6)]),
        ...                   [("f", 6, 2)], source="blocks")
        >>> t["f"].starts.tolist(), t["f"].crcs.tolist()
        ([0, 4], [1, 2])
    """
    if len(data) % 8:
        raise CheckpointCorruptError(f"{source}: {len(data)} bytes, not a whole number of 8-byte block records")
    rows = np.frombuffer(data, dtype="<u4").reshape(-1, 2).astype(np.int64)
    want = sum(count for _, _, count in files)
    if len(rows) != want:
        raise CheckpointCorruptError(f"{source}: holds {len(rows)} blocks, the index lists {want}")
    tables: dict[str, BlockTable] = {}
    at = 0
    for name, size, count in files:
        lengths = rows[at : at + count, 0]
        if (lengths <= 0).any() or int(lengths.sum()) != size:
            raise CheckpointCorruptError(
                f"{source}: the blocks recorded for {name} add up to {int(lengths.sum())} bytes, the file has {size}"
            )
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tables[name] = BlockTable(starts, rows[at : at + count, 1].astype(np.uint32), size)
        at += count
    return tables
