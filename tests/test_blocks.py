"""Block checksums (the pure core of verified loads): plans, writers' shares, tables, checks, records."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_safetensors.blocks import (
    BlockTable,
    block_crcs,
    block_shares,
    decode_tables,
    encode_tables,
    file_crc,
    plan_blocks,
)
from dcp_safetensors.errors import CheckpointCorruptError, ChecksumMismatchError


def ends(starts: np.ndarray, size: int) -> list[int]:
    return [*starts[1:].tolist(), size]


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 5000), cuts=st.lists(st.integers(-5, 5100), max_size=12), max_block=st.integers(1, 700))
def test_blocks_start_at_every_cut_tile_the_file_and_none_is_longer_than_max(size, cuts, max_block):
    starts = plan_blocks(size, cuts, max_block)
    if size == 0:
        assert len(starts) == 0
        return
    assert starts[0] == 0 and (np.diff(starts) > 0).all() and starts[-1] < size
    lengths = np.diff(np.append(starts, size))
    assert lengths.max() <= max_block
    assert {c for c in cuts if 0 < c < size} <= set(starts.tolist())
    # no more blocks than the cuts force: each segment between cuts has ceil(len / max_block)
    segments = sorted({0, *(c for c in cuts if 0 < c < size)})
    assert len(starts) == sum(-(-(b - a) // max_block) for a, b in zip(segments, [*segments[1:], size], strict=True))


@st.composite
def written_file(draw):
    """A file, its blocks, and writers whose runs cover it exactly once: some as one run per chunk,
    some as a column shard (equal runs on a stride, interleaved with the other writers')."""
    rows = draw(st.integers(1, 12))
    row_bytes = draw(st.integers(1, 40))
    header = draw(st.integers(1, 50))
    size = header + rows * row_bytes
    data = draw(st.binary(min_size=size, max_size=size))
    cols = sorted(draw(st.sets(st.integers(1, row_bytes - 1), max_size=3))) if row_bytes > 1 else []
    writers: list[tuple[list[int], int]] = [([0], header)]  # the header, one run
    bounds = [0, *cols, row_bytes]
    for lo, hi in zip(bounds, bounds[1:], strict=False):  # column shards: a run per row
        writers.append(([header + r * row_bytes + lo for r in range(rows)], hi - lo))
    if draw(st.booleans()) and not cols:  # or row shards: one run per writer
        cut = draw(st.integers(0, rows))
        writers = [([0], header)] + [([header + a * row_bytes], (b - a) * row_bytes) for a, b in ((0, cut), (cut, rows)) if b > a]
    cuts = draw(st.lists(st.integers(0, size), max_size=6))
    max_block = draw(st.integers(1, 64))
    return data, writers, plan_blocks(size, cuts, max_block)


@settings(max_examples=300, deadline=None)
@given(case=written_file())
def test_writers_shares_make_every_block_crc_and_the_file_crc(case):
    data, writers, starts = case
    size = len(data)
    shares = []
    for offsets, length in writers:
        held = b"".join(data[o : o + length] for o in offsets)
        shares.append(block_shares(starts, size, offsets, length, held))
    random.Random(len(data)).shuffle(shares)  # the coordinator gets them in any order
    crcs = block_crcs(starts, size, shares)
    assert crcs.tolist() == [zlib.crc32(data[a:b]) for a, b in zip(starts.tolist(), ends(starts, size), strict=True)]
    assert file_crc(BlockTable(starts, crcs, size)) == zlib.crc32(data)


def table_of(data: bytes, starts: np.ndarray) -> BlockTable:
    crcs = [zlib.crc32(data[a:b]) for a, b in zip(starts.tolist(), ends(starts, len(data)), strict=True)]
    return BlockTable(starts, np.asarray(crcs, dtype=np.uint32), len(data))


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=5),
    max_block=st.integers(1, 100),
    read=st.tuples(st.integers(0, 600), st.integers(1, 600)),
    flip=st.tuples(st.integers(0, 599), st.integers(0, 7)),
)
def test_a_flipped_bit_is_caught_by_the_read_that_covers_it_and_only_by_it(data, cuts, max_block, read, flip):
    size = len(data)
    table = table_of(data, plan_blocks(size, cuts, max_block))
    start = min(read[0], size - 1)
    end = min(size, start + read[1])
    lo, hi = table.span(start, end)
    assert lo <= start and end <= hi and (lo == 0 or lo in table.starts) and (hi == size or hi in table.starts)
    assert hi - lo <= (end - start) + 2 * max_block  # at most a partial block more at each end
    table.check(lo, data[lo:hi], source="f", what="w")  # intact: passes
    at, bit = min(flip[0], size - 1), flip[1]
    bad = bytearray(data)
    bad[at] ^= 1 << bit
    if lo <= at < hi:
        with pytest.raises(ChecksumMismatchError, match=r"^f: bytes \d+-\d+ \(block \d+ of \d+\) have checksum crc32:[0-9a-f]{8}, the save recorded crc32:[0-9a-f]{8}: .*; w$"):
            table.check(lo, bytes(bad[lo:hi]), source="f", what="w")
    else:
        table.check(lo, bytes(bad[lo:hi]), source="f", what="w")


def test_a_read_along_the_saved_cuts_reads_no_extra_byte():
    # Four ranks' row shards of a 1,000-byte tensor after a 96-byte header: blocks cut at each shard's ends.
    size, shard = 1096, 250
    starts = plan_blocks(size, [96 + r * shard for r in range(4)], max_block=64)
    table = BlockTable(starts, np.zeros(len(starts), np.uint32), size)
    for r in range(4):
        assert table.span(96 + r * shard, 96 + (r + 1) * shard) == (96 + r * shard, 96 + (r + 1) * shard)


def test_a_partial_block_is_not_checked():
    data = b"abcdefgh"
    table = table_of(data, np.array([0, 4]))
    table.check(2, b"XXef", source="f", what="w")  # block 0 only in part: left alone, block 1 not whole either
    with pytest.raises(ChecksumMismatchError, match="block 1 of 2"):
        table.check(2, b"XXefgX", source="f", what="w")


def test_records_round_trip_and_a_damaged_record_is_named():
    data_a, data_b = bytes(range(100)), bytes(range(7))
    tables = [table_of(data_a, plan_blocks(100, [30], 32)), table_of(data_b, plan_blocks(7, [], 32))]
    record = encode_tables(tables)
    assert len(record) == 8 * (len(tables[0].starts) + 1)
    files = [("a", 100, len(tables[0].starts)), ("b", 7, 1)]
    decoded = decode_tables(record, files, source="blocks")
    for (name, _, _), table in zip(files, tables, strict=True):
        assert decoded[name].starts.tolist() == table.starts.tolist() and decoded[name].crcs.tolist() == table.crcs.tolist()
    with pytest.raises(CheckpointCorruptError, match="not a whole number"):
        decode_tables(record[:-1], files, source="blocks")
    with pytest.raises(CheckpointCorruptError, match="holds 5 blocks, the index lists 6"):
        decode_tables(record, [*files[:1], ("b", 7, 2)], source="blocks")
    with pytest.raises(CheckpointCorruptError, match="the blocks recorded for b add up to 7 bytes, the file has 8"):
        decode_tables(record, [files[0], ("b", 8, 1)], source="blocks")
