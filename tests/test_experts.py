"""Fused MoE experts: the pure rules (pieces of any box tile every per-expert tensor), then across ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import (
    TRANSPOSED_INTERLEAVED,
    fused_reference,
    load_ep_uneven,
    load_into_fsdp_moe,
    moe_logits,
    save_ep_sharded,
    save_fsdp_moe,
    tiny_qwen3_moe,
)
from safetensors import safe_open

import dcp_safetensors
from dcp_safetensors import SafetensorsLoadPlanner, SafetensorsSavePlanner
from dcp_safetensors.errors import CheckpointMismatchError, ConfigurationError
from dcp_safetensors.experts import (
    MIXTRAL_EXPERTS,
    TRANSFORMERS_EXPERTS,
    ExpertSplit,
    FusedExperts,
    expert_pieces,
    expert_shape,
    resolve_rules,
)
from dcp_safetensors.mapping import MappingError


def reference(fused: np.ndarray, split: ExpertSplit, e: int) -> np.ndarray:
    """The per-expert tensor, straight from its definition."""
    x = fused[e]
    if x.ndim:
        block = x.shape[split.dim] // split.parts
        sel = [slice(None)] * x.ndim
        if split.interleaved:
            sel[split.dim] = slice(split.part, None, split.parts)
        else:
            sel[split.dim] = slice(split.part * block, (split.part + 1) * block)
        x = x[tuple(sel)]
    return np.swapaxes(x, -1, -2) if split.transpose else x


def grid_boxes(shape, cuts):
    """Boxes of the grid whose cut points along each dim are ``cuts[d]`` (a tiling of ``shape``)."""
    edges = [sorted({0, n, *(c for c in cs if 0 < c < n)}) for n, cs in zip(shape, cuts)]
    spans = [list(zip(e[:-1], e[1:])) or [(0, 0)] for e in edges]
    boxes = [((), ())]
    for dim_spans in spans:
        boxes = [(o + (a,), s + (b - a,)) for o, s in boxes for a, b in dim_spans]
    return boxes


@st.composite
def fused_case(draw):
    ndim = draw(st.integers(1, 3))  # dims of one expert's slice
    dim = draw(st.integers(0, ndim - 1))
    parts = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 4))] + [draw(st.integers(0, 4)) for _ in range(ndim)]
    shape[dim + 1] = draw(st.integers(0, 3)) * parts
    split = ExpertSplit(
        "{prefix}.{e}.w",
        dim=dim,
        parts=parts,
        part=draw(st.integers(0, parts - 1)),
        interleaved=draw(st.booleans()),
        transpose=ndim >= 2 and draw(st.booleans()),
    )
    cuts = [draw(st.lists(st.integers(0, n), max_size=3)) for n in shape]
    return tuple(shape), split, cuts


@settings(max_examples=400, deadline=None)
@given(fused_case())
def test_pieces_of_a_tiling_tile_every_expert_exactly(case):
    shape, split, cuts = case
    rule = FusedExperts("{prefix}.fused", (split,))
    fused = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    out_shape = expert_shape(split, shape)
    got = {e: np.full(out_shape, -1, dtype=np.int64) for e in range(shape[0])}
    written = {e: np.zeros(out_shape, dtype=np.int64) for e in range(shape[0])}
    for offsets, sizes in grid_boxes(shape, cuts):
        box = fused[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
        for piece in expert_pieces(rule, "p", shape, offsets, sizes):
            e = int(piece.name.split(".")[1])
            data = box[piece.index]
            if piece.transpose:
                data = np.swapaxes(data, -1, -2)
            assert data.shape == piece.sizes or data.size == 0
            region = tuple(slice(o, o + s) for o, s in zip(piece.offsets, piece.sizes))
            got[e][region] = data.reshape(got[e][region].shape)
            written[e][region] += 1
    for e in range(shape[0]):
        np.testing.assert_array_equal(got[e], reference(fused, split, e))
        assert (written[e] == 1).all(), f"expert {e}: some element written {written[e].max()} times or never"


def test_transformers_rules_match_save_pretrained_names_and_shapes():
    gate_up, down = TRANSFORMERS_EXPERTS
    assert gate_up.match("model.layers.0.mlp.experts.gate_up_proj") == "model.layers.0.mlp"
    assert gate_up.match("model.layers.0.mlp.experts.gate_up_proj_bias") is None
    assert down.names("x", 2) == ["x.experts.0.down_proj.weight", "x.experts.1.down_proj.weight"]
    assert [expert_shape(s, (8, 2 * 5, 3)) for s in gate_up.splits] == [(5, 3), (5, 3)]
    assert MIXTRAL_EXPERTS[0].names("model.layers.1", 1) == [
        "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.experts.0.w3.weight",
    ]


def test_transposed_interleaved_layout_is_a_rule():
    # gpt-oss keeps gate_up_proj as [E, H, 2I], gate/up interleaved in the last dim.
    rule = FusedExperts(
        "{prefix}.gate_up_proj",
        (
            ExpertSplit("{prefix}.{e}.gate_proj.weight", dim=1, parts=2, part=0, interleaved=True, transpose=True),
            ExpertSplit("{prefix}.{e}.up_proj.weight", dim=1, parts=2, part=1, interleaved=True, transpose=True),
        ),
    )
    fused = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    (gate, up, *_) = expert_pieces(rule, "l", fused.shape, (0, 0, 0), fused.shape)
    np.testing.assert_array_equal(np.swapaxes(fused[gate.index], -1, -2), fused[0][:, 0::2].T)
    np.testing.assert_array_equal(np.swapaxes(fused[up.index], -1, -2), fused[0][:, 1::2].T)
    assert gate.sizes == (2, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExpertSplit("{prefix}.w"),  # no {e}
        lambda: ExpertSplit("{e}.{layer}.w"),  # unknown field
        lambda: ExpertSplit("{e}.w", parts=2, part=2),
        lambda: FusedExperts("{prefix}.{e}.fused", (ExpertSplit("{e}.w"),)),
        lambda: FusedExperts("{prefix}.fused", ()),
        lambda: resolve_rules(["not a rule"]),  # type: ignore[list-item]
    ],
)
def test_malformed_rules_are_errors(make):
    with pytest.raises(MappingError):
        make()


def test_shapes_that_do_not_split_name_the_key():
    with pytest.raises(MappingError, match=r"'layers.0.gate_up_proj'.*does not split into 2"):
        expert_shape(TRANSFORMERS_EXPERTS[0].splits[0], (4, 7, 3), key="layers.0.gate_up_proj")
    with pytest.raises(MappingError, match="cannot transpose"):
        expert_shape(ExpertSplit("{e}.w", transpose=True), (4, 7))



# --- across ranks: transformers' Qwen3-MoE under FSDP2, EP-sharded experts ----------------


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_fsdp2_qwen3_moe_saves_what_save_pretrained_writes_and_loads_back(ranks, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = tiny_qwen3_moe(seed=0)
    reference.save_pretrained(str(tmp_path / "hf"))
    ranks(2).run(save_fsdp_moe, str(tmp_path / "ours"))
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "hf")
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in theirs  # per-expert keys on disk
    assert sorted(ours) == sorted(theirs)
    different = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not different, different
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # experts spread over several files

    expected = moe_logits(reference)
    assert torch.equal(moe_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()), expected)
    for source in ("ours", "hf"):
        for rank, same in enumerate(ranks(2).run(load_into_fsdp_moe, str(tmp_path / source))):
            assert "model.layers.1.mlp.experts.gate_up_proj" in same
            assert all(same.values()), f"{source}, rank {rank}: {[k for k, v in same.items() if not v]}"


@pytest.mark.parametrize("transposed", [False, True], ids=["transformers", "transposed-interleaved"])
def test_ep_sharded_experts_save_per_expert_and_load_unevenly(ranks, tmp_path, transposed):
    ranks(4).run(save_ep_sharded, str(tmp_path), transposed)
    full = fused_reference()
    rules = TRANSPOSED_INTERLEAVED if transposed else TRANSFORMERS_EXPERTS
    stored = _tensors(tmp_path)
    for key, value in full.items():
        if "experts" not in key:
            assert torch.equal(stored[key], value)
            continue
        fused = value.transpose(1, 2) if transposed else value
        (rule, prefix), *_ = [(r, r.match(key)) for r in rules if r.match(key) is not None]
        for split in rule.splits:
            for e in range(fused.shape[0]):
                expected = torch.from_numpy(reference(fused.numpy(), split, e).copy())
                assert torch.equal(stored[split.name.format(prefix=prefix, e=e)], expected)
    # 6 experts on 4 ranks: one rank holds none and still takes part.
    for rank, ok in enumerate(ranks(4).run(load_ep_uneven, str(tmp_path), transposed)):
        assert all(ok.values()), f"rank {rank}: {ok}"


def test_missing_expert_key_names_it_and_the_checkpoint(tmp_path):
    sd = fused_reference(experts=3)
    dcp_safetensors.save(sd, tmp_path, planner=SafetensorsSavePlanner(hf_experts=True))
    bigger = {k: torch.zeros(4, *v.shape[1:]) for k, v in fused_reference(experts=4).items() if "experts" in k}
    with pytest.raises(CheckpointMismatchError, match=r"no tensor 'layers.0.mlp.experts.3.(gate|down)_proj.weight', expert 3 of"):
        dcp_safetensors.load(bigger, tmp_path, planner=SafetensorsLoadPlanner(hf_experts=True))
    # A fused key stored as it is (saved without hf_experts) loads as it is.
    dcp_safetensors.save(sd, tmp_path / "fused")
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    dcp_safetensors.load(out, tmp_path / "fused", planner=SafetensorsLoadPlanner(hf_experts=True))
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_a_checkpoint_mixing_fused_and_per_expert_layers_loads(tmp_path):
    full = {f"layers.{i}.mlp.experts.gate_up_proj": torch.randn(3, 4, 2) for i in range(2)}
    only_layer_1 = (
        FusedExperts(
            "{prefix}.1.mlp.experts.gate_up_proj",
            (
                ExpertSplit("{prefix}.1.mlp.experts.{e}.gate_proj.weight", parts=2, part=0),
                ExpertSplit("{prefix}.1.mlp.experts.{e}.up_proj.weight", parts=2, part=1),
            ),
        ),
    )
    dcp_safetensors.save(full, tmp_path, planner=SafetensorsSavePlanner(hf_experts=only_layer_1))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "layers.0.mlp.experts.gate_up_proj" in f.keys() and "layers.1.mlp.experts.2.up_proj.weight" in f.keys()
    out = {k: torch.zeros_like(v) for k, v in full.items()}
    dcp_safetensors.load(out, tmp_path, planner=SafetensorsLoadPlanner(hf_experts=True))
    assert all(torch.equal(out[k], full[k]) for k in full)


def test_a_rule_that_matches_nothing_warns_or_with_strict_fails(tmp_path, caplog):
    state = {"layers.0.mlp.experts.gate_up_proj": torch.ones(2, 4, 2)}  # no down_proj
    dcp_safetensors.save(state, tmp_path, planner=SafetensorsSavePlanner(hf_experts=True))
    assert "no key matches '{prefix}.experts.down_proj'" in caplog.text
    with pytest.raises(ConfigurationError, match=r"no key matches '\{prefix\}.experts.down_proj'"):
        dcp_safetensors.save(state, tmp_path, planner=SafetensorsSavePlanner(hf_experts=True, strict=True))
    with pytest.raises(ConfigurationError, match=r"no key matches '\{prefix\}.experts.down_proj'"):
        dcp_safetensors.load(state, tmp_path, planner=SafetensorsLoadPlanner(hf_experts=True, strict=True))
