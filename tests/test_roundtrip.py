"""Multi-rank save and resharding load of mixed placements, dtypes and shapes (gloo on CPU)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
from cases import (
    big_state,
    load_big,
    load_mixed,
    load_tp_fsdp,
    mixed_state,
    save_big,
    save_mixed,
    save_mixed_row_rounds,
    save_tp_fsdp,
)
from helpers import tp_mlp
from safetensors import safe_open

from dcp_safetensors import read_checkpoint, verify
from dcp_safetensors.format import parse_header


def _check_files_match_full_tensors(path) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    full = mixed_state()
    assert set(index["weight_map"]) == set(full)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in full.values())
    for key, t in full.items():
        file = path / index["weight_map"][key]
        with safe_open(str(file), "pt") as f:
            assert f.metadata()["format"] == "pt"
            got = f.get_tensor(key)
        assert got.dtype == t.dtype and got.shape == t.shape, key
        # Bytes equal what save_file writes for the full tensor.
        assert safetensors.torch.save({key: got}) == safetensors.torch.save({key: t}), key
    verify(str(path))


@pytest.fixture(scope="module")
def saved_mixed(ranks, tmp_path_factory):
    """``saved_mixed(n)``: a directory with the mixed state as ``n`` ranks saved it, written once per
    module. The tests given it only read it."""
    paths = {}

    def get(world_size: int):
        if world_size not in paths:
            path = tmp_path_factory.mktemp(f"mixed-{world_size}-ranks")
            ranks(world_size).run(save_mixed, str(path))
            paths[world_size] = path
        return paths[world_size]

    return get


@pytest.mark.parametrize("world_size", [2, 4])
def test_save_mixed_placements_matches_full_tensors(saved_mixed, world_size):
    path = saved_mixed(world_size)
    assert sorted(p.name for p in path.iterdir()) == ["block_checksums.crc32", "model.safetensors", "model.safetensors.index.json"]
    _check_files_match_full_tensors(path)


def test_save_many_files_respects_max_shard_size(ranks, tmp_path):
    ranks(2).run(save_mixed, str(tmp_path), 200)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in files:
        raw = (tmp_path / name).read_bytes()
        header = parse_header(raw, len(raw))
        data = sum(e.nbytes for e in header.tensors.values())
        assert data <= 200 or len(header.tensors) == 1
    _check_files_match_full_tensors(tmp_path)


def test_posix_saves_default_to_a_file_per_rank_with_the_same_tensors(ranks, tmp_path):
    """On POSIX the default ``min_files`` gives 2 ranks at least 2 files (ranks sharing one file write at one
    writer's speed); ``min_files=1`` gives one. The tensors are the same, bit for bit, and both load back."""
    import torch

    shapes = [(2048, 2048)] * 5  # 5 x 16 MiB fp32
    ranks(2).run(save_big, str(tmp_path / "auto"), shapes, {})
    ranks(2).run(save_big, str(tmp_path / "one"), shapes, {"min_files": 1})
    full = big_state(shapes)
    for name, files in (("auto", 3), ("one", 1)):
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == files, index["weight_map"]
        saved = {}
        for file in set(index["weight_map"].values()):
            saved.update(safetensors.torch.load_file(str(tmp_path / name / file)))
        assert saved.keys() == full.keys() and all(torch.equal(saved[k], full[k]) for k in full), name
        verify(str(tmp_path / name))
        assert all(ranks(2).run(load_big, str(tmp_path / name), shapes, {}))


def test_column_shards_swap_rows_in_many_rounds(ranks, tmp_path):
    """Short-run column chunks (``cols``, ``grid``, ``deep``) are exchanged between ranks and written as row
    blocks; a 64-byte transfer budget cuts them into one-row slabs over many rounds, every rank taking part in
    each: the files hold the full tensors, their checksums match, and 4 ranks load them back."""
    rounds = ranks(4).run(save_mixed_row_rounds, str(tmp_path), {"transfer_budget": 64})
    assert rounds[0] >= 3, rounds  # the coordinator's count: several rounds ran
    _check_files_match_full_tensors(tmp_path)  # bytes of save_file, and verify()'s checksums
    for rank, ok in enumerate(ranks(4).run(load_mixed, str(tmp_path))):
        assert all(ok.values()), f"rank {rank}: mismatched keys {[k for k, v in ok.items() if not v]}"


@pytest.mark.parametrize("load_world", [1, 2, 3])
def test_reshard_4_to_n(ranks, saved_mixed, load_world):
    results = ranks(load_world).run(load_mixed, str(saved_mixed(4)))
    for rank, ok in enumerate(results):
        assert all(ok.values()), f"rank {rank}: mismatched keys {[k for k, v in ok.items() if not v]}"


@pytest.mark.parametrize("reshard", ["transpose", "plain"])
def test_load_into_other_placements(ranks, saved_mixed, reshard):
    """Saved Shard(0) loads into Shard(1) (and back), and FSDP2 state loads into unsharded tensors."""
    for rank, ok in enumerate(ranks(2).run(load_mixed, str(saved_mixed(2)), reshard)):
        assert all(ok.values()), f"rank {rank}: mismatched keys {[k for k, v in ok.items() if not v]}"


def test_loads_huggingface_hub_output(ranks, tmp_path):
    """A checkpoint this package did not write (huggingface_hub, indexed, several files) loads resharded."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(mixed_state(), str(tmp_path), max_shard_size=300)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = read_checkpoint(str(tmp_path))
    assert not ckpt.written_by_us and len(ckpt.headers) > 2
    for rank, ok in enumerate(ranks(2).run(load_mixed, str(tmp_path))):
        assert all(ok.values()), f"rank {rank}: mismatched keys {[k for k, v in ok.items() if not v]}"


def test_fsdp2_and_tp_on_the_same_dim(ranks, tmp_path):
    """FSDP2 over dp after TP over tp shards dim 0 twice (_StridedShard): DCP's offsets are trusted, and right."""
    import torch

    placements = ranks(4).run(save_tp_fsdp, str(tmp_path))[0]
    assert any(p.startswith("_S(") for p in placements), placements  # _StridedShard
    torch.manual_seed(0)
    full = tp_mlp().state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key, t in full.items():
            assert torch.equal(f.get_tensor(key), t), key
    assert all(ranks(4).run(load_tp_fsdp, str(tmp_path)))
