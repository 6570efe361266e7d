"""The one-place helpers: key prefixes, a read past a file's end, the checks of an opened checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_safetensors import SafetensorsWriter, read_checkpoint, verify
from dcp_safetensors.checkpoint import check_snapshot, open_snapshot
from dcp_safetensors.errors import (
    CheckpointCorruptError,
    ChecksumMismatchError,
    ConfigurationError,
    FileSizeMismatchError,
    InvalidIndexError,
    MissingFileError,
    MissingKeyError,
    UnsafePathError,
    shrank,
    truncated,
)
from dcp_safetensors.index import parse_index
from dcp_safetensors.mapping import (
    MappingError,
    check_prefix,
    place_key,
    under_prefix,
    with_prefix,
    without_prefix,
)
from dcp_safetensors.names import INDEX_NAME, MODEL_GROUP, TRAINING_STATE_GROUP
from dcp_safetensors.pinned import PinnedFiles
from dcp_safetensors.storage import LocalStorage
from dcp_safetensors.verification import verify_all

# --- key prefixes ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [None, ""])
def test_no_prefix_leaves_every_key_as_it_is(prefix):
    assert with_prefix(prefix, "a.b") == "a.b"
    assert under_prefix(prefix, "a.b") == "a.b"
    assert without_prefix(prefix, "a.b") == "a.b"
    assert place_key("a.b", prefix) == (MODEL_GROUP, "a.b")


def test_a_prefix_is_a_whole_first_component():
    assert with_prefix("model", "w") == "model.w"
    assert under_prefix("model", "model.layers.0.w") == "layers.0.w"
    assert under_prefix("model", "model_ema.w") is None  # a sibling, not under it
    assert under_prefix("model", "model") is None
    assert without_prefix("model", "model_ema.w") == "model_ema.w"
    assert place_key("model.w", "model") == (MODEL_GROUP, "w")
    assert place_key("optim.state.0.exp_avg", "model") == (TRAINING_STATE_GROUP, "optim.state.0.exp_avg")
    assert under_prefix("a.b", with_prefix("a.b", "c")) == "c"


@pytest.mark.parametrize("value", ["", "model.", "."])
def test_check_prefix_refuses_an_empty_or_dotted_prefix(value):
    with pytest.raises(ConfigurationError, match=f"model_prefix must be a key prefix without a trailing dot, got {value!r}"):
        check_prefix(value, "model_prefix")
    with pytest.raises(MappingError, match="strip_prefix must be"):
        check_prefix(value, "strip_prefix", MappingError)
    with pytest.raises(ConfigurationError, match="model_prefix must be"):
        SafetensorsWriter("unused", model_prefix=value)
    check_prefix(None, "model_prefix")
    check_prefix("model.language_model", "model_prefix")


# --- a read past a file's end ------------------------------------------------------------------


class _Files:
    """Names a file by where it was opened: the path changes once the read starts."""

    def __init__(self) -> None:
        self.opened = False

    def path(self, name: str) -> str:
        return f"/{'staging' if self.opened else 'ckpt'}/{name}"


def test_an_eof_becomes_a_checkpoint_error_naming_the_copy_that_was_read():
    files = _Files()
    with pytest.raises(CheckpointCorruptError) as info:
        with truncated(files, "f.safetensors", "'w'"):
            files.opened = True
            raise EOFError("file ends before byte 96")
    assert type(info.value) is CheckpointCorruptError
    assert str(info.value) == "/staging/f.safetensors: truncated while reading 'w': file ends before byte 96"
    assert info.value.__suppress_context__
    with pytest.raises(FileSizeMismatchError, match=r"^/ckpt/f.safetensors: shrank while being checked \(short\)$"):
        with shrank(_Files(), "f.safetensors"):
            raise EOFError("short")


def test_other_errors_pass_through_an_eof_helper():
    with pytest.raises(OSError, match="disk"):
        with truncated(_Files(), "f", "'w'"):
            raise OSError("disk")
    with shrank(_Files(), "f"):
        pass


# --- the checks of an opened checkpoint ---------------------------------------------------------


def _save(path, n: int = 4) -> list[str]:
    state = {f"layer.{i}.w": torch.full((64, 64), float(i)) for i in range(n)}
    dcp.save(state, storage_writer=SafetensorsWriter(str(path), max_shard_size=20000), no_dist=True)
    return sorted(json.loads((path / INDEX_NAME).read_text())["metadata"]["dcp_safetensors"]["files"])


def _edit_index(path, fn) -> None:
    index = json.loads((path / INDEX_NAME).read_text())
    fn(index)
    (path / INDEX_NAME).write_text(json.dumps(index))


def test_every_problem_is_listed_and_read_checkpoint_raises_the_first(tmp_path):
    files = _save(tmp_path)
    (tmp_path / files[2]).unlink()
    _edit_index(tmp_path, lambda i: i["weight_map"].update({"extra.0": files[0], "extra.1": files[0]}))
    view = open_snapshot(LocalStorage(str(tmp_path)))
    try:
        ckpt, problems = check_snapshot(str(tmp_path), view, None)
    finally:
        view.close()
    assert [type(p) for p in problems] == [MissingFileError, MissingKeyError]
    assert "2 tensors listed in the index ('extra.0', 'extra.1') are not in this file" in str(problems[1])
    assert files[2] not in ckpt.headers and "layer.0.w" in ckpt.tensors
    with pytest.raises(MissingFileError, match=files[2]):
        read_checkpoint(str(tmp_path))
    assert [type(p) for p in verify_all(str(tmp_path)).problems] == [MissingFileError, MissingKeyError]


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda i: i.update(weight_map=[]), InvalidIndexError, "no 'weight_map' object"),
        (lambda i: i["weight_map"].update({"a": "../a"}), UnsafePathError, "'../a'"),
        (lambda i: i["metadata"]["dcp_safetensors"]["files"].update({"/etc/x": {}}), UnsafePathError, "'/etc/x'"),
        (lambda i: i["metadata"]["dcp_safetensors"].update(aliases=[1]), InvalidIndexError, "'aliases' is not an object"),
        (lambda i: i["metadata"]["dcp_safetensors"].update(objects="a/../../o.json"), UnsafePathError, "o.json"),
    ],
)
def test_a_broken_index_is_raised_alone(tmp_path, edit, error, match):
    index = json.loads(_save_index(tmp_path))
    edit(index)
    with pytest.raises(error, match=match):
        parse_index(index, source=str(tmp_path / INDEX_NAME), root=str(tmp_path))
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    report = verify_all(str(tmp_path))
    assert report.checkpoint is None and [type(p) for p in report.problems] == [error]


def _save_index(path) -> str:
    _save(path, 2)
    return (path / INDEX_NAME).read_text()


def test_verify_reads_no_file_after_the_first_broken_one(tmp_path, monkeypatch):
    files = _save(tmp_path)
    data = bytearray((tmp_path / files[0]).read_bytes())
    data[-1] ^= 1
    (tmp_path / files[0]).write_bytes(bytes(data))
    read: list[tuple[str, int]] = []
    original = PinnedFiles.readinto

    def counting(self, name, offset, buffer):
        read.append((name, offset))
        return original(self, name, offset, buffer)

    monkeypatch.setattr(PinnedFiles, "readinto", counting)
    with pytest.raises(ChecksumMismatchError, match=files[0]):
        verify(str(tmp_path), chunk_size=4096)
    # Headers are read from offset 0 when the checkpoint is opened; checksums read on in chunks.
    assert {name for name, offset in read if offset > 0} == {files[0]}
    read.clear()
    report = verify_all(str(tmp_path), chunk_size=4096)
    assert [type(p) for p in report.problems] == [ChecksumMismatchError] and report.files_checked == len(files)
    assert {name for name, offset in read if offset > 0} == set(files)
