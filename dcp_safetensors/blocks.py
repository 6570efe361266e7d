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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from dcp_safetensors.checksum import combine_run_arrays, crc32, crc32_combine, shift_crcs, zeros_crc
from dcp_safetensors.errors import CheckpointCorruptError, ChecksumMismatchError

__all__ = [
    "MAX_BLOCK",
    "BlockShares",
    "BlockTable",
    "plan_blocks",
    "block_shares",
    "block_crcs",
    "file_crc",
    "encode_tables",
    "decode_tables",
]

MAX_BLOCK = 4 << 20
"""The longest block. Blocks are cut at the save's chunk ends, so this bounds only what a load
with another sharding reads beyond its bytes (one partial block per end of a run) and the size of
the record: 8 bytes per block, 2 MB per TB."""


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
    given = np.asarray(list(cuts), dtype=np.int64)
    segments = np.unique(np.concatenate([[0], given[(given > 0) & (given < size)]]))
    lengths = np.diff(np.append(segments, size))
    counts = -(-lengths // max_block)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(segments, counts) + within * max_block


def _lengths(starts: np.ndarray, size: int) -> np.ndarray:
    return np.diff(np.append(starts, size)).astype(np.int64)


class BlockShares(NamedTuple):
    """One writer's part in the CRCs of a file's blocks: ``shares[i]`` for block ``blocks[i]``, and the CRC-32 of each run it wrote."""

    blocks: np.ndarray
    shares: np.ndarray
    run_crcs: np.ndarray


def block_shares(starts: np.ndarray, size: int, offsets: Sequence[int] | np.ndarray, length: int, data: Any) -> BlockShares:
    """The shares of the runs one writer wrote into a file with blocks ``starts``: run ``i`` is
    ``length`` bytes at file offset ``offsets[i]``, held by ``data[i * length:(i + 1) * length]``
    (any buffer). Every byte is CRC'd once, in pieces cut at the block starts; the runs' own CRCs
    (e.g. an object store's part checksums) are combined from their pieces.

    Example:
        >>> import zlib
        >>> s = block_shares(np.array([0, 4]), 8, [2], 4, b"cdef")
        >>> s.blocks.tolist(), s.run_crcs.tolist() == [zlib.crc32(b"cdef")]
        ([0, 1], True)
    """
    view = memoryview(data).cast("B")
    offsets = np.asarray(offsets, dtype=np.int64)
    if length <= 0 or not len(offsets):
        empty = np.zeros(0, dtype=np.int64)
        return BlockShares(empty, empty.astype(np.uint32), np.zeros(len(offsets), dtype=np.uint32))
    ends = np.append(starts[1:], size)
    first = np.searchsorted(starts, offsets, side="right") - 1
    last = np.searchsorted(starts, offsets + length - 1, side="right") - 1
    blocks, crcs, lengths, after = [], [], [], []
    run_crcs = np.zeros(len(offsets), dtype=np.uint32)
    for i, (offset, b0, b1) in enumerate(zip(offsets.tolist(), first.tolist(), last.tolist(), strict=True)):
        base = i * length - offset  # data index of file offset 0, for this run
        run_crc = 0
        lo = offset
        for b in range(b0, b1 + 1):
            hi = min(int(ends[b]), offset + length)
            crc = crc32(view[base + lo : base + hi])
            blocks.append(b)
            crcs.append(crc)
            lengths.append(hi - lo)
            after.append(int(ends[b]) - hi)
            run_crc = crc32_combine(run_crc, crc, hi - lo)
            lo = hi
        run_crcs[i] = run_crc
    ids = np.asarray(blocks, dtype=np.int64)
    piece_lengths = np.asarray(lengths, dtype=np.int64)
    terms = shift_crcs(np.asarray(crcs, dtype=np.uint32) ^ zeros_crc(piece_lengths), np.asarray(after, dtype=np.int64))
    order = np.argsort(ids, kind="stable")
    ids, terms = ids[order], terms[order]
    unique, first_of = np.unique(ids, return_index=True)
    return BlockShares(unique, np.bitwise_xor.reduceat(terms, first_of).astype(np.uint32), run_crcs)


def block_crcs(starts: np.ndarray, size: int, shares: Iterable[BlockShares | tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The CRC-32 of every block, from the :func:`block_shares` of every writer of the file (uint32).

    The writers' runs must cover the file exactly once, which the save plan proves before a byte
    is written: a block nobody wrote reads as its zeros.
    """
    crcs = zeros_crc(_lengths(starts, size))
    for share in shares:
        np.bitwise_xor.at(crcs, np.asarray(share[0], dtype=np.int64), np.asarray(share[1], dtype=np.uint32))
    return crcs


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

    def check(self, offset: int, data: Any, *, source: str, what: str) -> None:
        """Raise :class:`~dcp_safetensors.errors.ChecksumMismatchError` unless every block that lies
        wholly in ``data`` (the file's bytes from ``offset``) has its recorded CRC-32.

        ``source`` names the file and ``what`` the tensor(s) read, in the message.

        Example:
            >>> import zlib
            >>> table = BlockTable(np.array([0, 2]), np.array([zlib.crc32(b"ab"), zlib.crc32(b"cd")], np.uint32), 4)
            >>> table.check(0, b"abcd", source="f", what="tensor 'w'")
            >>> table.check(2, b"cx", source="f", what="tensor 'w'")
            Traceback (most recent call last):
            dcp_safetensors.errors.ChecksumMismatchError: f: bytes 2-4 (block 1 of 2), read for tensor 'w', have CRC-32 ...
        """
        view = memoryview(data).cast("B")
        end = offset + len(view)
        first = int(np.searchsorted(self.starts, offset, side="left"))
        stop = int(np.searchsorted(self.starts, end, side="right"))
        ends = np.append(self.starts[1:], self.size)
        for b in range(first, stop):
            lo, hi = int(self.starts[b]), int(ends[b])
            if hi > end:
                break
            found = crc32(view[lo - offset : hi - offset])
            if found != int(self.crcs[b]):
                raise ChecksumMismatchError(
                    f"{source}: bytes {lo}-{hi} (block {b} of {len(self.starts)}), read for {what}, have CRC-32 "
                    f"{found:08x}, the save recorded {int(self.crcs[b]):08x}: the file changed on storage after it "
                    "was written (a bad disk, copy or sync); nothing was loaded from it. Restore the file or save again"
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
