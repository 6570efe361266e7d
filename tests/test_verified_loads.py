"""Verified loads: every byte a load reads is checked against the block checksums the save recorded."""

from __future__ import annotations

import random
import shutil
import zlib

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from cases import (
    error_summary,
    extra_bytes_of_a_load,
    load_mixed,
    load_mixed_checking_on_rank_0,
    load_mixed_keys,
    save_mixed,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import dcp_safetensors
from dcp_safetensors import SafetensorsReader
from dcp_safetensors.blocks import BlockTable, plan_blocks
from dcp_safetensors.checked_reads import CheckedReads
from dcp_safetensors.checkpoint import read_checkpoint
from dcp_safetensors.errors import ChecksumMismatchError
from dcp_safetensors.pinned import PinnedFiles
from dcp_safetensors.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# --- the checked read, against a real file ------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    max_block=st.integers(1, 500),
    reads=st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 900)), min_size=1, max_size=6),
    flip=st.tuples(st.integers(0, 2999), st.integers(0, 7)),
)
def test_checked_reads_give_the_bytes_and_fail_exactly_when_a_read_block_is_bad(
    tmp_path_factory, data, cuts, max_block, reads, flip
):
    root = tmp_path_factory.mktemp("f")
    size = len(data)
    starts = plan_blocks(size, cuts, max_block)
    bounds = [*starts.tolist(), size]
    table = BlockTable(starts, np.asarray([zlib.crc32(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)], np.uint32), size)
    at = min(flip[0], size - 1)
    bad = bytearray(data)
    bad[at] ^= 1 << flip[1]
    for content, flipped in ((data, False), (bytes(bad), True)):
        (root / "f").write_bytes(content)
        files = PinnedFiles(open_storage(str(root)))
        reads_of = CheckedReads(files, {"f": table}, what="w")
        try:
            for offset, length in reads:
                offset = min(offset, size - 1)
                length = min(length, size - offset)
                lo, hi = table.span(offset, offset + length)
                out = bytearray(length)
                if flipped and lo <= at < hi:
                    with pytest.raises(ChecksumMismatchError, match=r"/f: bytes \d+-\d+ \(block \d+ of \d+\) have checksum crc32:.*; w$"):
                        reads_of.readinto("f", offset, memoryview(out))
                else:
                    reads_of.readinto("f", offset, memoryview(out))
                    assert bytes(out) == content[offset : offset + length]
            assert reads_of.bytes_read - reads_of.bytes_asked <= 2 * max_block * len(reads)
        finally:
            files.close()


# --- loads from real saves: one process ----------------------------------------------------------


def flip_bit(path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_fails_the_load_of_its_tensor_only_with_every_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(300, 40, generator=g), "b": torch.randn(5000, generator=g), "c": torch.randn(3, generator=g)}
    dcp_safetensors.save(sd, tmp_path)
    ckpt = read_checkpoint(str(tmp_path))
    assert ckpt.blocks and set(ckpt.blocks) == set(ckpt.headers)
    loc = ckpt.tensors["b"]
    flip_bit(tmp_path / loc.file, loc.offset + 1000, 3)

    def target(*keys):
        return {k: torch.zeros_like(sd[k]) for k in keys}

    with pytest.raises(ChecksumMismatchError, match=rf"{loc.file}: bytes .*the load of 'b' fails rather than hand on wrong weights"):
        dcp_safetensors.load(target("a", "b", "c"), tmp_path)
    with pytest.raises(dcp.api.CheckpointException, match="ChecksumMismatchError"):
        dcp.load(target("b"), storage_reader=SafetensorsReader(tmp_path), no_dist=True)
    # Loads that do not read the flipped byte pass, and load exact bytes.
    out = target("a", "c")
    dcp.load(out, storage_reader=SafetensorsReader(tmp_path), no_dist=True)
    assert all(torch.equal(out[k], sd[k]) for k in out)
    # verify_checksums=False loads the flipped value, as a reader without checks would.
    out = target("b")
    dcp.load(out, storage_reader=SafetensorsReader(tmp_path, verify_checksums=False), no_dist=True)
    assert not torch.equal(out["b"], sd["b"]) and (out["b"] != sd["b"]).sum() == 1


def test_checkpoints_of_other_tools_load_unchecked(tmp_path, caplog):
    import logging

    import safetensors.torch

    safetensors.torch.save_file({"w": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    out = {"w": torch.zeros(4)}
    with caplog.at_level(logging.DEBUG, logger="dcp_safetensors"):
        dcp.load(out, storage_reader=SafetensorsReader(tmp_path), no_dist=True)
    assert torch.equal(out["w"], torch.ones(4))
    assert any("records no block checksums" in r.getMessage() for r in caplog.records)


# --- loads from real saves: two ranks, every layout -----------------------------------------------


@pytest.fixture(scope="module")
def mixed_checkpoint(ranks, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed")
    ranks(2).run(save_mixed, str(path))
    return path


def test_random_bit_flips_are_caught_by_every_load_that_reads_them_and_only_those(ranks, mixed_checkpoint, tmp_path):
    pool = ranks(2)
    ckpt = read_checkpoint(str(mixed_checkpoint))
    stored = {k: loc for k, loc in ckpt.tensors.items() if loc.nbytes}
    rng = random.Random(7)
    for trial in range(5):
        key = rng.choice(sorted(stored))
        loc = stored[key]
        at, bit = loc.offset + rng.randrange(loc.nbytes), rng.randrange(8)
        path = tmp_path / f"trial-{trial}"
        shutil.copytree(mixed_checkpoint, path)
        flip_bit(path / loc.file, at, bit)
        for reshard in (None, "transpose", "plain"):  # the save's shards, column shards, whole tensors
            failures = pool.run(error_summary, load_mixed, str(path), reshard)[0]
            assert failures, (key, reshard)
            assert reshard != "plain" or set(failures) == {0, 1}  # every rank reads every byte
            for rank, (kind, message) in failures.items():
                assert kind == "ChecksumMismatchError" and f"the load of {key!r} fails" in message and loc.file in message, (rank, message)
        others = [k for k in ckpt.tensors if k != key]
        for rank_result in pool.run(load_mixed_keys, str(path), others, None):
            assert all(rank_result.values()), (key, [k for k, ok in rank_result.items() if not ok])


def test_a_load_with_the_saves_sharding_reads_no_extra_byte(ranks, mixed_checkpoint, tmp_path):
    """Blocks are cut at every chunk's rows: a Shard(0) load like the save reads whole blocks only."""
    extra = ranks(2).run(extra_bytes_of_a_load, str(mixed_checkpoint), ["even", "uneven", "dtypes.float32", "hsdp"])
    assert extra == [0, 0]


def test_a_block_record_of_another_save_or_missing_is_named(tmp_path):
    from dcp_safetensors.errors import MissingFileError, SnapshotMismatchError
    from dcp_safetensors.names import BLOCKS_FILE

    for name, value in (("a", 1.0), ("b", 2.0)):
        dcp_safetensors.save({"w": torch.full((1000,), value)}, tmp_path / name)
    shutil.copy(tmp_path / "b" / BLOCKS_FILE, tmp_path / "a" / BLOCKS_FILE)  # same size, another save's
    with pytest.raises(SnapshotMismatchError, match=rf"{BLOCKS_FILE}: checksum crc32:\w+ differs from crc32:\w+ recorded in the index"):
        read_checkpoint(str(tmp_path / "a"))
    (tmp_path / "a" / BLOCKS_FILE).unlink()
    with pytest.raises(MissingFileError, match=BLOCKS_FILE):
        dcp_safetensors.load({"w": torch.zeros(1000)}, tmp_path / "a")


def test_a_save_from_before_block_checksums_loads_and_verifies_as_before(tmp_path):
    """An index of ours without the block record (format 1, saved before this version): loads
    unchecked, its file checksums still verified."""
    import json

    from dcp_safetensors import verify
    from dcp_safetensors.names import BLOCK_KEY, BLOCKS_FILE, INDEX_NAME

    sd = {"w": torch.arange(1000.0)}
    dcp_safetensors.save(sd, tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    block = index["metadata"][BLOCK_KEY]
    block.pop("block_checksums")
    for record in block["files"].values():
        record.pop("blocks")
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    (tmp_path / BLOCKS_FILE).unlink()
    assert read_checkpoint(str(tmp_path)).blocks == {}
    out = {"w": torch.zeros(1000)}
    dcp_safetensors.load(out, tmp_path)
    assert torch.equal(out["w"], sd["w"])
    assert verify(str(tmp_path)).checksums


def test_verify_checksums_set_differently_on_each_rank_fails_the_checking_rank_and_never_hangs(ranks, mixed_checkpoint, tmp_path):
    """A local option: each rank checks what it reads or not; a failure on one is raised on both (DCP gathers it)."""
    ckpt = read_checkpoint(str(mixed_checkpoint))
    loc = ckpt.tensors["even"]
    shutil.copytree(mixed_checkpoint, tmp_path / "ckpt")
    flip_bit(tmp_path / "ckpt" / loc.file, loc.offset + 5)
    summaries = ranks(2).run(load_mixed_checking_on_rank_0, str(tmp_path / "ckpt"))
    assert summaries[0] == summaries[1] and set(summaries[0]) == {0}
    assert summaries[0][0][0] == "ChecksumMismatchError" and "'even'" in summaries[0][0][1]
