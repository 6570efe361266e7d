"""Bad checkpoints and failing ranks: clear errors naming the file/key/rank, nothing committed is lost."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from cases import (
    load_missing,
    mixed_state,
    save_failing_on_rank1,
    save_mixed,
    save_with_meta_on_rank1,
    save_with_shape_clash,
)
from torch.distributed.checkpoint.api import CheckpointException

import dcp_safetensors
from dcp_safetensors import SafetensorsReader, SafetensorsWriter, read_checkpoint, verify
from dcp_safetensors.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    FileSizeMismatchError,
    HeaderTooLargeError,
    InvalidIndexError,
    MissingFileError,
    MissingKeyError,
    SnapshotMismatchError,
    UnsafePathError,
)
from dcp_safetensors.saving import WrittenParts

INDEX = "model.safetensors.index.json"


def save(path, value: float = 1.0, **kwargs) -> None:
    state = {f"layer.{i}.w": torch.full((64, 64), value + i) for i in range(4)}
    dcp.save(state, storage_writer=SafetensorsWriter(str(path), max_shard_size=20000, **kwargs), no_dist=True)


def load_error(path) -> BaseException:
    """The error a dcp.load raises, unwrapped from DCP's CheckpointException."""
    target = {f"layer.{i}.w": torch.zeros(64, 64) for i in range(4)}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=SafetensorsReader(str(path)), no_dist=True)
    (exc, _), = info.value.failures.values()
    return exc


def edit_index(path, fn) -> None:
    index = json.loads((path / INDEX).read_text())
    fn(index)
    (path / INDEX).write_text(json.dumps(index))


def test_file_from_another_snapshot_is_refused(tmp_path):
    save(tmp_path / "a", 1.0)
    save(tmp_path / "b", 2.0)
    shutil.copy(tmp_path / "b" / "model-00002-of-00004.safetensors", tmp_path / "a" / "model-00002-of-00004.safetensors")
    err = load_error(tmp_path / "a")
    assert isinstance(err, SnapshotMismatchError) and "model-00002-of-00004.safetensors" in str(err)


def test_truncated_file_is_refused(tmp_path):
    save(tmp_path)
    f = tmp_path / "model-00003-of-00004.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    err = load_error(tmp_path)
    assert isinstance(err, FileSizeMismatchError) and "model-00003-of-00004.safetensors" in str(err)


def test_missing_file_is_refused(tmp_path):
    save(tmp_path)
    (tmp_path / "model-00001-of-00004.safetensors").unlink()
    err = load_error(tmp_path)
    assert isinstance(err, MissingFileError) and "model-00001-of-00004.safetensors" in str(err)


def test_key_absent_from_its_file_is_refused(tmp_path):
    save(tmp_path)
    edit_index(tmp_path, lambda i: i["weight_map"].update({"layer.9.w": "model-00001-of-00004.safetensors"}))
    with pytest.raises(MissingKeyError, match=r"layer\.9\.w.*model-00001-of-00004|model-00001-of-00004.*layer\.9\.w"):
        read_checkpoint(str(tmp_path))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors", "sub\\x"])
def test_index_path_outside_directory_is_refused(tmp_path, name):
    save(tmp_path)
    edit_index(tmp_path, lambda i: i["weight_map"].update({"layer.0.w": name}))
    with pytest.raises(UnsafePathError, match="outside the checkpoint directory"):
        read_checkpoint(str(tmp_path))


def test_malformed_index_json_is_refused(tmp_path):
    save(tmp_path)
    (tmp_path / INDEX).write_text('{"weight_map": {')
    with pytest.raises(InvalidIndexError, match=INDEX):
        read_checkpoint(str(tmp_path))


def test_huge_header_length_fails_before_allocating(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    err = load_error(tmp_path)
    assert isinstance(err, HeaderTooLargeError) and "model.safetensors" in str(err)


def test_distcp_directory_gets_a_conversion_hint(tmp_path):
    dcp.save({"w": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    with pytest.raises(CheckpointNotFoundError, match="dcp-safetensors convert"):
        read_checkpoint(str(tmp_path))


def test_verify_catches_a_flipped_bit(tmp_path):
    save(tmp_path)
    verify(str(tmp_path))
    f = tmp_path / "model-00004-of-00004.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="model-00004-of-00004.safetensors"):
        verify(str(tmp_path))


def test_error_on_one_rank_reaches_every_rank(ranks, tmp_path):
    results = ranks(2).run(save_with_shape_clash, str(tmp_path))
    for failures in results:
        ((name, message),) = failures.values()
        assert name == "LayoutError" and "'w'" in message and "rank 1" in message


def test_failed_write_on_one_rank_keeps_the_previous_checkpoint(ranks, tmp_path):
    ranks(2).run(save_mixed, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    results = ranks(2).run(save_failing_on_rank1, str(tmp_path), 7.0)
    for failures in results:
        assert failures[1][0] == "OSError" and "injected on rank 1" in failures[1][1]
        assert failures[0][0] == "RankFailedError" and "rank 1" in failures[0][1] and "injected" in failures[0][1]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    ckpt = read_checkpoint(str(tmp_path))
    assert set(ckpt.tensors) == set(mixed_state())


@pytest.mark.parametrize(("kind", "key"), [("dtensor", "even"), ("plain", "rank1.extra")])
def test_meta_tensor_under_dcps_default_planner_is_named_on_every_rank(ranks, tmp_path, kind, key):
    ranks(2).run(save_mixed, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for failures in ranks(2).run(save_with_meta_on_rank1, str(tmp_path), kind):
        name, message = failures[1]
        assert name == "ConfigurationError", failures
        assert message.startswith(f"rank 1: these tensors are on the meta device and hold no data to save: {key!r};")
        assert "SafetensorsSavePlanner(meta_resolver=...)" in message and "to_empty" in message
        assert failures[0][0] == "RankFailedError" and "rank 1" in failures[0][1] and repr(key) in failures[0][1]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_missing_checkpoint_error_has_our_type_on_every_rank(ranks, tmp_path):
    for failures in ranks(2).run(load_missing, str(tmp_path / "nope")):
        assert set(failures) == {0, 1}  # read once on rank 0, the same error raised on both
        for name, message in failures.values():
            assert name == "CheckpointNotFoundError" and "nope" in message


class _LosingWriter(SafetensorsWriter):
    """Reports 4 KiB fewer than it wrote to its second file: finish must see the shortfall and refuse to commit.

    On POSIX each rank writes its runs in place and reports per file its bytes
    and CRC share; the commit checks every rank's bytes against its plan.
    """

    lost: tuple[str, int, int] | None = None

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).value()
        (i,) = [i for i, r in enumerate(results) if isinstance(r.storage_data, WrittenParts)]
        written = results[i].storage_data
        rows = written.in_place.copy()
        (row,) = np.flatnonzero(rows[:, 0] == 1)
        self.lost = (written.files[1], int(rows[row, 1]) - 4096, int(rows[row, 1]))
        rows[row, 1] -= 4096
        results[i] = dataclasses.replace(results[i], storage_data=dataclasses.replace(written, in_place=rows))
        fut = torch.futures.Future()
        fut.set_result(results)  # the block checksums' report goes with it, untouched
        return fut


def test_finish_refuses_a_rank_that_wrote_less_than_its_plan(tmp_path):
    save(tmp_path, 1.0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    state = {f"layer.{i}.w": torch.full((64, 64), 5.0 + i) for i in range(4)}
    writer = _LosingWriter(str(tmp_path), max_shard_size=20000, max_part=4096)  # 4 files of 16 KiB of data
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=writer, no_dist=True)
    (exc, _), = info.value.failures.values()
    name, got, want = writer.lost
    assert type(exc).__name__ == "LayoutError"
    assert str(exc) == f"{name}: rank 0 wrote {got} bytes, its plan holds {want}; refusing to commit"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_pathlib_paths_and_missing_parent_directories(tmp_path):
    target = tmp_path / "runs" / "exp" / "step-1"  # parents do not exist yet
    dcp.save({"w": torch.ones(3)}, storage_writer=SafetensorsWriter(target), no_dist=True)
    out = {"w": torch.zeros(3)}
    dcp.load(out, storage_reader=SafetensorsReader(target), no_dist=True)
    assert out["w"].tolist() == [1.0, 1.0, 1.0]


def test_pickled_weights_directory_gets_a_conversion_hint(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointNotFoundError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        read_checkpoint(str(tmp_path))


def test_a_failed_roll_forward_keeps_the_committed_save(tmp_path):
    """Past the commit point a failure is completed by the next load, never undone (local storage).

    A directory in the way of the data file makes publishing fail after the
    commit record is durable: the save raises, its staging (the committed
    snapshot) stays, and the next load rolls it forward once the way is clear.
    """
    dcp_safetensors.save({"w": torch.zeros(4)}, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").mkdir()
    (tmp_path / "model.safetensors" / "in-the-way").write_text("x")
    with pytest.raises(OSError):
        dcp_safetensors.save({"w": torch.arange(4.0)}, tmp_path)
    assert [p.name for p in tmp_path.glob(".dcp_safetensors-staging-*/COMMIT.json")] == ["COMMIT.json"]
    shutil.rmtree(tmp_path / "model.safetensors")
    out = {"w": torch.zeros(4)}
    dcp_safetensors.load(out, tmp_path)
    assert out["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
