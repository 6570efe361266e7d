"""Fused MoE experts: the pure rules (pieces of any box tile every per-expert tensor), then across ranks."""

from __future__ import annotations

import json
import re

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
    tiny_moe,
    tiny_qwen3_moe,
    uneven_from_local,
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


# --- variations: every shipped rule set against transformers, no process group, odd layouts --


def _equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in dtype, shape or bytes (or that only one side has)."""
    return sorted(k for k in ours.keys() | theirs.keys() if k not in ours or k not in theirs or ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k]))


@pytest.mark.parametrize(
    "architecture, rules",
    [(a, True) for a in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "glm4_moe")]
    + [(a, MIXTRAL_EXPERTS) for a in ("mixtral", "minimax")],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_shipped_rules_write_and_read_what_save_pretrained_does(tmp_path, architecture, rules):
    model = tiny_moe(architecture, seed=0)
    model.save_pretrained(str(tmp_path / "hf"))
    dcp_safetensors.save(model.state_dict(), tmp_path / "ours", planner=SafetensorsSavePlanner(hf_experts=rules, strict=True))
    theirs = _tensors(tmp_path / "hf")
    assert not [k for k in theirs if k.endswith(".experts.gate_up_proj")]  # transformers writes them per expert
    assert not _equal(_tensors(tmp_path / "ours"), theirs)

    expected = model.state_dict()
    target = tiny_moe(architecture, seed=1).state_dict()
    dcp_safetensors.load(target, tmp_path / "hf", planner=SafetensorsLoadPlanner(hf_experts=rules, strict=True))
    assert not _equal(target, expected)


def test_a_checkpoint_saved_without_the_rules_loads_with_them_as_it_is(tmp_path):
    """Mixtral's router keeps its in-memory name in a checkpoint saved without hf_experts; it is read as it is."""
    model = tiny_moe("mixtral", seed=0)
    dcp_safetensors.save(model.state_dict(), tmp_path)
    assert "model.layers.0.mlp.gate.weight" in _tensors(tmp_path)
    target = tiny_moe("mixtral", seed=1).state_dict()
    dcp_safetensors.load(target, tmp_path, planner=SafetensorsLoadPlanner(hf_experts=MIXTRAL_EXPERTS))
    assert not _equal(target, model.state_dict())


def test_gpt_oss_experts_stored_fused_are_refused_by_per_expert_rules(tmp_path):
    """gpt-oss keeps gate_up_proj as [E, H, 2I] and save_pretrained writes it fused: the rules must not cut it."""
    model = tiny_moe("gpt_oss", seed=0)
    model.save_pretrained(str(tmp_path / "hf"))
    theirs = _tensors(tmp_path / "hf")
    assert list(theirs["model.layers.0.mlp.experts.gate_up_proj"].shape) == [4, 16, 16]  # [E, H, 2I], fused
    assert list(theirs["model.layers.0.mlp.experts.down_proj"].shape) == [4, 8, 16]  # [E, I, H]
    with pytest.raises(ConfigurationError, match=r"'hidden' is 16 in 'model.layers.0.mlp.experts.\{e\}.gate_proj.weight'.*save without hf_experts"):
        dcp_safetensors.save(model.state_dict(), tmp_path / "ours", planner=SafetensorsSavePlanner(hf_experts=True))
    assert not (tmp_path / "ours").exists()
    dcp_safetensors.save(model.state_dict(), tmp_path / "ours")
    assert not _equal(_tensors(tmp_path / "ours"), theirs)

    # save_pretrained's fused keys are read as they are, rules or not.
    target = tiny_moe("gpt_oss", seed=1).state_dict()
    dcp_safetensors.load(target, tmp_path / "hf", planner=SafetensorsLoadPlanner(hf_experts=True))
    assert not _equal(target, model.state_dict())
    # Per-expert keys (gpt-oss's own layout, split by its rules) cannot fill it through transformers' rules.
    dcp_safetensors.save(model.state_dict(), tmp_path / "split", planner=SafetensorsSavePlanner(hf_experts=TRANSPOSED_INTERLEAVED))
    with pytest.raises(ConfigurationError, match="not in the layout the rules describe.*wrong axis"):
        dcp_safetensors.load(target, tmp_path / "split", planner=SafetensorsLoadPlanner(hf_experts=True))


def test_meta_initialised_moe_loads_in_one_process_without_a_process_group(tmp_path):
    """The low-memory path: a model built on meta, loaded without init_process_group."""
    import torch.distributed.checkpoint as dcp

    from dcp_safetensors import SafetensorsReader

    reference = tiny_qwen3_moe(seed=0)
    reference.save_pretrained(str(tmp_path))
    for load in (
        lambda sd: dcp_safetensors.load(sd, tmp_path, planner=SafetensorsLoadPlanner(hf_experts=True)),
        lambda sd: dcp.load(
            sd,
            storage_reader=SafetensorsReader(str(tmp_path)),
            planner=SafetensorsLoadPlanner(hf_experts=True, broadcast_from_rank0=True),
            no_dist=True,
        ),
    ):
        with torch.device("meta"):
            model = type(reference)(reference.config)
        state = model.state_dict()
        load(state)
        assert all(t.device.type == "cpu" for t in state.values())
        assert not _equal(state, reference.state_dict())


def test_uneven_from_local_experts_are_refused_naming_the_key_and_rank(ranks, tmp_path):
    """5 experts as 2 + 3: DCP places shards by torch.chunk's 3 + 2, so the layout cannot be checkpointed."""
    for rank, errors in enumerate(ranks(2).run(uneven_from_local, str(tmp_path))):
        for what, (kind, message) in errors.items():
            assert kind == "ConfigurationError", f"rank {rank}, {what}: {kind}: {message}"
            # Every rank raises rank 0's error: its first DTensor, 2 experts where torch.chunk puts 3.
            assert re.search(r"DTensor 'layers.0.mlp.(experts.\w+|gate.weight)' on rank 0: its local shard is \[2, \d+(, \d+)?\], "
                             r"but .* put \[3, \d+(, \d+)?\] at offset \[0, 0(, 0)?\]", message), message
            assert "distribute_tensor" in message


def test_per_expert_checkpoint_into_fused_targets_without_rules_names_the_fix(tmp_path):
    tiny_qwen3_moe(seed=0).save_pretrained(str(tmp_path / "qwen"))
    target = tiny_qwen3_moe(seed=1).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"'model.layers.0.mlp.experts.(gate_up|down)_proj'.*per expert.*SafetensorsLoadPlanner\(hf_experts=True\)"):
        dcp_safetensors.load(target, tmp_path / "qwen")
    tiny_moe("mixtral", seed=0).save_pretrained(str(tmp_path / "mixtral"))
    target = tiny_moe("mixtral", seed=1).state_dict()
    for planner in (SafetensorsLoadPlanner(), SafetensorsLoadPlanner(hf_experts=True)):
        with pytest.raises(CheckpointMismatchError, match=r"block_sparse_moe.experts.0.w\d.weight.*hf_experts=dcp_safetensors.experts.MIXTRAL_EXPERTS"):
            dcp_safetensors.load(target, tmp_path / "mixtral", planner=planner)
