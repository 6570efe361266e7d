"""torch's per-rank HF output (``HuggingFaceStorageWriter(save_distributed=True)``, no index) reads like any checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

import dcp_safetensors
from dcp_safetensors import SafetensorsReader
from dcp_safetensors.checkpoint import read_checkpoint
from dcp_safetensors.errors import CheckpointCorruptError, CheckpointMismatchError
from dcp_safetensors.torch_shards import SHARDING_INFO_KEY, torch_shard_name
from dcp_safetensors.verification import verify_all

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def write_rank_files(path, tensors: dict[str, torch.Tensor], cuts: dict[str, list[list[int]]], ranks: int) -> None:
    """Write ``tensors`` as torch's writer would from ``ranks`` ranks: ``cuts[key][d]`` are the cut points of dim d;
    the grid's cells go to ranks round-robin, each cell a tensor of its own with its ``saved_offsets``."""
    per_rank: list[tuple[dict[str, torch.Tensor], dict[str, dict]]] = [({}, {}) for _ in range(ranks)]
    for key, full in tensors.items():
        bounds = [[0, *c, full.shape[d]] for d, c in enumerate(cuts[key])]
        cells = [[]]
        for b in bounds:
            cells = [cell + [(lo, hi)] for cell in cells for lo, hi in zip(b, b[1:], strict=False)]
        for i, cell in enumerate(cells):
            tensors_of, info = per_rank[i % ranks]
            if key in tensors_of:  # a rank holds one chunk per key: give the cell to the next free rank
                free = [r for r in range(ranks) if key not in per_rank[r][0]]
                tensors_of, info = per_rank[free[0]]
            tensors_of[key] = full[tuple(slice(lo, hi) for lo, hi in cell)].contiguous()
            info[key] = {"saved_offsets": [lo for lo, _ in cell]}
    for rank, (tensors_of, info) in enumerate(per_rank):
        if tensors_of:
            meta = {SHARDING_INFO_KEY: json.dumps(info), "DCP_VERSION": "1.0", "format": "pt"}
            safetensors.torch.save_file(tensors_of, os.path.join(path, torch_shard_name(rank + 1, 1, 1)), metadata=meta)


def load_plain(path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, through ``dcp.load`` with DCP's own planner, in one process."""
    ckpt = read_checkpoint(str(path))
    sd = {k: torch.zeros(loc.shape, dtype=loc_dtype(loc.dtype)) for k, loc in ckpt.tensors.items()}
    sd.update({k: torch.zeros(t.shape, dtype=loc_dtype(t.dtype)) for k, t in ckpt.chunked.items()})
    dcp.load(sd, storage_reader=SafetensorsReader(str(path)))
    return sd


def loc_dtype(name: str) -> torch.dtype:
    from dcp_safetensors.dtypes import to_torch_dtype

    return to_torch_dtype(name)


@st.composite
def sharded_tensors(draw):
    n = draw(st.integers(1, 3))
    tensors, cuts = {}, {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.float16]))
        full = (torch.arange(max(1, torch.Size(shape).numel())) * 7 + i).reshape(shape).to(dtype)
        tensors[f"layers.{i}.w"] = full
        cuts[f"layers.{i}.w"] = [sorted(draw(st.sets(st.integers(1, d - 1), max_size=2))) if d > 1 else [] for d in shape]
    return tensors, cuts


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def cells(cuts: list[list[int]]) -> int:
    n = 1
    for c in cuts:
        n *= len(c) + 1
    return n


@settings(max_examples=40, deadline=None)
@given(case=sharded_tensors(), ranks=st.integers(1, 4))
def test_any_grid_of_per_rank_pieces_loads_and_converts_bit_exact(tmp_path_factory, case, ranks):
    tensors, cuts = case
    ranks = max([ranks, *(cells(c) for c in cuts.values())])  # one chunk per rank and key, as DTensor gives
    path = tmp_path_factory.mktemp("per-rank")
    write_rank_files(path, tensors, cuts, ranks)
    loaded = load_plain(path)
    assert {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in loaded.items()} == {
        k: (v.dtype, tuple(v.shape), bits(v)) for k, v in tensors.items()
    }
    # convert puts the pieces together into ordinary HF files
    from dcp_safetensors.convert import convert

    dst = tmp_path_factory.mktemp("hf")
    convert(str(path), str(dst))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    converted = {}
    for file in set(index["weight_map"].values()):
        converted.update(safetensors.torch.load_file(str(dst / file)))
    assert {k: bits(v) for k, v in converted.items()} == {k: bits(v) for k, v in tensors.items()}


def two_rank_checkpoint(path) -> torch.Tensor:
    full = torch.arange(24.0).reshape(4, 6)
    write_rank_files(path, {"w": full}, {"w": [[2], []]}, ranks=2)
    return full


def test_a_missing_last_rank_file_shrinks_the_tensor_and_the_load_refuses_it(tmp_path):
    two_rank_checkpoint(tmp_path)
    (tmp_path / torch_shard_name(2, 1, 1)).unlink()
    # torch records no global shape: rows 0-1 are all there is, a whole (2, 6) tensor. A load into the
    # model's (4, 6) then fails on the shape, with DCP's planner and with ours; nothing is half-loaded.
    assert read_checkpoint(str(tmp_path)).tensors["w"].shape == (2, 6)
    with pytest.raises(CheckpointException, match=r"Size mismatch between saved torch.Size\(\[2, 6\]\)"):
        dcp.load({"w": torch.zeros(4, 6)}, storage_reader=SafetensorsReader(str(tmp_path)), no_dist=True)
    with pytest.raises(CheckpointMismatchError, match=r"\[2, 6\]"):
        dcp_safetensors.load({"w": torch.zeros(4, 6)}, str(tmp_path))


def test_a_hole_between_pieces_is_a_corrupt_checkpoint_naming_the_files(tmp_path):
    full = torch.arange(36.0).reshape(6, 6)
    write_rank_files(tmp_path, {"w": full}, {"w": [[2, 4], []]}, ranks=3)
    (tmp_path / torch_shard_name(2, 1, 1)).unlink()  # rows 2-3
    with pytest.raises(CheckpointCorruptError, match=r"'w'.*cover 24 of 36 elements.*rank 0 wrote shard-00001.*rank 2 wrote shard-00003"):
        read_checkpoint(str(tmp_path))


def test_stale_files_of_a_save_with_more_ranks_are_refused_not_mixed_in(tmp_path):
    full = torch.arange(48.0).reshape(8, 6)
    write_rank_files(tmp_path, {"w": full}, {"w": [[2, 4, 6], []]}, ranks=4)  # an earlier run, 4 ranks
    write_rank_files(tmp_path, {"w": full + 100}, {"w": [[4], []]}, ranks=2)  # this run, 2 ranks: 3 and 4 are stale
    report = verify_all(str(tmp_path))
    assert not report.ok
    message = str(report.problems[0])
    assert "overlaps" in message and "shard-00003" in message and "remove the stale shard-* files" in message
    with pytest.raises(CheckpointCorruptError, match="overlaps"):
        dcp_safetensors.load({"w": torch.zeros(8, 6)}, str(tmp_path))


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"format": "pt"}, "has no 'DCP_SHARDING_INFO'"),
        ({SHARDING_INFO_KEY: "{not json"}, "is not JSON"),
        ({SHARDING_INFO_KEY: json.dumps({"w": {"saved_offsets": [0]}})}, r"tensor 'w' of shape \[2, 6\] has no valid saved_offsets"),
        ({SHARDING_INFO_KEY: json.dumps({"x": {"saved_offsets": [0, 0]}})}, "has no valid saved_offsets"),
    ],
)
def test_a_per_rank_file_without_usable_offsets_is_named(tmp_path, meta, match):
    two_rank_checkpoint(tmp_path)
    bad = tmp_path / torch_shard_name(2, 1, 1)
    safetensors.torch.save_file({"w": torch.ones(2, 6)}, str(bad), metadata=meta)
    with pytest.raises(CheckpointCorruptError, match=match) as e:
        read_checkpoint(str(tmp_path))
    assert str(bad) in str(e.value)


def test_pieces_of_one_tensor_in_two_dtypes_are_refused(tmp_path):
    write_rank_files(tmp_path, {"w": torch.ones(4, 2)}, {"w": [[2], []]}, ranks=2)
    safetensors.torch.save_file(
        {"w": torch.ones(2, 2, dtype=torch.bfloat16)}, str(tmp_path / torch_shard_name(2, 1, 1)),
        metadata={SHARDING_INFO_KEY: json.dumps({"w": {"saved_offsets": [2, 0]}})},
    )
    with pytest.raises(CheckpointCorruptError, match=r"'w' is stored in different dtypes \(shard-00001.*F32.*BF16"):
        read_checkpoint(str(tmp_path))


def test_inspect_and_verify_describe_per_rank_files(tmp_path):
    two_rank_checkpoint(tmp_path)
    run = [sys.executable, "-m", "dcp_safetensors.cli"]
    inspect = subprocess.run([*run, "inspect", str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    row = json.loads(inspect.stdout)["tensors"][0]
    assert row["shape"] == [4, 6] and row["bytes"] == 96 and [p["offsets"] for p in row["pieces"]] == [[0, 0], [2, 0]]
    verify = subprocess.run([*run, "verify", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    assert "1 tensor in 2 files" in verify.stdout and "pieces cover it exactly once" in verify.stdout


# --- the real writer, from FSDP2 ranks ---------------------------------------------------------


def test_torch_per_rank_output_of_fsdp2_loads_resharded_with_and_without_our_planner(ranks, tmp_path):
    from hf_cases import load_torch_per_rank_resharded, save_fsdp_llama_torch_per_rank, tiny_llama

    pool = ranks(2)
    pool.run(save_fsdp_llama_torch_per_rank, str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" not in names
    assert [n for n in names if n.endswith(".safetensors")] == [torch_shard_name(r, f, 2) for r in (1, 2) for f in (1, 2)]
    for how in ("plain", "ours"):
        for rank_result in pool.run(load_torch_per_rank_resharded, str(tmp_path), how):
            assert rank_result and all(rank_result.values()), (how, [k for k, ok in rank_result.items() if not ok])
    # One process, every tensor whole, through DCP's own planner; and converted to ordinary HF files.
    reference = tiny_llama(seed=0).state_dict()
    loaded = load_plain(tmp_path)
    assert {k: bits(v) for k, v in loaded.items()} == {k: bits(v) for k, v in reference.items()}
