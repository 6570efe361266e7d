"""Key mapping (pure), dtype on save and on load, meta tensors, submodule export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import WithDraft
from planner_cases import (
    export_draft,
    export_missing,
    load_draft_into_other_sharding,
    load_renamed,
    save_renamed_bf16,
)
from safetensors import safe_open

import dcp_safetensors
from dcp_safetensors import (
    KeyMapping,
    SafetensorsLoadPlanner,
    SafetensorsSavePlanner,
    SafetensorsWriter,
)
from dcp_safetensors.errors import CheckpointMismatchError, ConfigurationError
from dcp_safetensors.mapping import MappingError

# --- KeyMapping, pure -------------------------------------------------------------------


def test_include_exclude_globs_and_callables():
    keys = ["a.w", "a.b", "b.w", "c"]
    assert KeyMapping(include=["a.*"]).names(keys) == {"a.w": "a.w", "a.b": "a.b"}
    assert KeyMapping(exclude=["*.w"]).names(keys) == {"a.b": "a.b", "c": "c"}
    assert KeyMapping(include=lambda k: "." not in k).names(keys) == {"c": "c"}
    assert KeyMapping(include=["a.*"], exclude=lambda k: k.endswith("b")).names(keys) == {"a.w": "a.w"}


def test_rename_prefixes_and_order():
    m = KeyMapping(strip_prefix="model", rename={"x": "y"}, add_prefix="lm")
    assert m.names(["model.x", "model.z", "other"]) == {"model.x": "lm.y", "model.z": "lm.z", "other": "lm.other"}
    assert KeyMapping(rename=str.upper).names(["ab"]) == {"ab": "AB"}


def test_sibling_prefixes_are_never_mixed():
    m = KeyMapping(include=["draft.*"], strip_prefix="draft")
    assert m.names(["draft.w", "draft_head.w", "draftw"]) == {"draft.w": "w"}


def test_collisions_name_both_keys():
    with pytest.raises(MappingError, match=r"'model\.w' and 'w' both map to 'w'"):
        KeyMapping(strip_prefix="model").names(["model.w", "w"])
    with pytest.raises(MappingError, match="both map to 'same'"):
        KeyMapping(rename=lambda k: "same").names(["a", "b"])


@pytest.mark.parametrize(
    "kwargs", [{"strip_prefix": "model."}, {"add_prefix": ""}, {"include": "a.*"}, {"rename": lambda k: ""}]
)
def test_malformed_rules_are_errors(kwargs):
    with pytest.raises(MappingError):
        KeyMapping(**kwargs).names(["a"])


# --- planners across ranks --------------------------------------------------------------


def test_save_renamed_and_cast_to_bf16_then_load_under_the_same_rules(ranks, tmp_path):
    ranks(2).run(save_renamed_bf16, str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "model.embed_tokens.weight" in index["weight_map"] and "embed.weight" not in index["weight_map"]
    assert not [k for k in index["weight_map"] if k.startswith("norm.")]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("layers.0.weight").dtype == torch.bfloat16
        assert f.get_tensor("positions").dtype == torch.int64  # integers are never cast

    for failures in ranks(2).run(load_renamed, str(tmp_path), "error"):
        (name, message), *_ = failures.values()
        assert name == "ConfigurationError" and "dtype_policy='cast'" in message and "torch.bfloat16" in message
    for rank, ok in enumerate(ranks(2).run(load_renamed, str(tmp_path), "cast")):
        assert all(ok.values()), f"rank {rank}: {[k for k, v in ok.items() if not v]}"


def test_meta_tensors_are_an_error_listing_every_key_or_resolved(tmp_path):
    state = {"a": torch.empty(2, device="meta"), "b": torch.ones(2), "c": torch.empty(3, device="meta")}
    with pytest.raises(dcp.api.CheckpointException) as info:
        dcp.save(state, storage_writer=SafetensorsWriter(str(tmp_path)), planner=SafetensorsSavePlanner(), no_dist=True)
    (exc, _), = info.value.failures.values()
    assert type(exc).__name__ == "ConfigurationError" and "a, c" in str(exc)

    store = {"a": torch.full((2,), 7.0), "c": torch.full((3,), 8.0)}
    planner = SafetensorsSavePlanner(meta_resolver=lambda key, t: store[key])
    dcp.save(state, storage_writer=SafetensorsWriter(str(tmp_path)), planner=planner, no_dist=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("a").tolist() == [7.0, 7.0] and f.get_tensor("c").tolist() == [8.0] * 3


def test_meta_check_runs_on_what_is_saved_after_the_mapping(tmp_path):
    """A meta buffer the mapping excludes is neither refused nor resolved."""
    state = {"model.w": torch.ones(2), "model.rotary.inv_freq": torch.empty(4, device="meta")}
    planner = SafetensorsSavePlanner(mapping=KeyMapping(exclude=["*.rotary.*"], strip_prefix="model"))
    dcp_safetensors.save(state, tmp_path, planner=planner)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["w"]
    # A kept meta tensor is still an error, named by its key in the caller's state dict.
    planner = SafetensorsSavePlanner(mapping=KeyMapping(strip_prefix="model"))
    with pytest.raises(ConfigurationError, match=r"on the meta device and have no data to save: model\.rotary\.inv_freq;"):
        dcp_safetensors.save(state, tmp_path / "kept", planner=planner)


def test_submodule_export_resolves_only_the_submodules_meta_tensors(tmp_path):
    """Offloaded (meta) weights inside and outside the submodule: the resolver is asked about its own only."""
    with torch.device("meta"):
        model = torch.nn.ModuleDict({"base": torch.nn.Linear(2, 2), "draft": torch.nn.Linear(2, 3)})
    offloaded = {"draft.weight": torch.arange(6.0).reshape(3, 2), "draft.bias": torch.arange(3.0)}
    asked = []

    def resolver(key, meta):
        asked.append(key)
        return offloaded[key]

    dcp_safetensors.save_submodule(model, "draft", tmp_path, meta_resolver=resolver, dtype=torch.bfloat16)
    assert sorted(asked) == ["draft.bias", "draft.weight"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["bias", "weight"]
        assert torch.equal(f.get_tensor("weight"), offloaded["draft.weight"].bfloat16())


def test_missing_and_resized_keys_are_our_error_naming_the_key_and_its_neighbours(tmp_path):
    dcp_safetensors.save({"model.layers.0.attn.weight": torch.ones(2), "model.layers.0.mlp.weight": torch.ones(3)}, tmp_path)
    target = {"model.layers.0.mlp.weight": torch.zeros(3), "model.layers.0.mlp.bias": torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match=r"1 target keys are not in the checkpoint: 'model.layers.0.mlp.bias' \(the checkpoint has near it: 'model.layers.0.mlp.weight'\).*allow_partial_load=True"):
        dcp_safetensors.load(target, tmp_path)
    dcp_safetensors.load(target, tmp_path, planner=SafetensorsLoadPlanner(allow_partial_load=True))
    assert target["model.layers.0.mlp.weight"].tolist() == [1.0] * 3
    # Nothing shares a parent: the nearest by spelling (here a prefix the checkpoint lacks).
    with pytest.raises(CheckpointMismatchError, match=r"'layers.0.attn.weight' \(the checkpoint has near it: 'model.layers.0.attn.weight'"):
        dcp_safetensors.load({"layers.0.attn.weight": torch.zeros(2)}, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"'model.layers.0.mlp.weight' \(\[3\] in the checkpoint, \[4\] in the target\)"):
        dcp_safetensors.load({"model.layers.0.mlp.weight": torch.zeros(4)}, tmp_path)


def test_submodule_export_without_gather_loads_into_another_sharding(ranks, tmp_path):
    ranks(2).run(export_draft, str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]  # no draft_head keys
    torch.manual_seed(0)
    reference = WithDraft().state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in index["weight_map"]:
            assert torch.equal(f.get_tensor(key), reference["draft." + key])
    assert all(ranks(2).run(load_draft_into_other_sharding, str(tmp_path)))


def test_missing_submodule_is_the_same_error_on_every_rank(ranks, tmp_path):
    for result in ranks(2).run(export_missing, str(tmp_path)):
        assert result == ("ConfigurationError", "model has no submodule 'drafts' (on any rank)")


def test_tied_tensors_are_written_once_and_restored_into_untied_targets(tmp_path):
    shared = torch.arange(6.0)
    state = {"embed.weight": shared, "mid": torch.ones(2), "lm_head.weight": shared}
    dcp.save(state, storage_writer=SafetensorsWriter(str(tmp_path)), planner=SafetensorsSavePlanner(), no_dist=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["embed.weight", "mid"]
    assert index["metadata"]["dcp_safetensors"]["aliases"] == {"lm_head.weight": "embed.weight"}
    # DCP's default planner, untied target: the reader serves the alias from the kept tensor.
    target = {"embed.weight": torch.zeros(6), "mid": torch.zeros(2), "lm_head.weight": torch.zeros(6)}
    dcp.load(target, storage_reader=dcp_safetensors.SafetensorsReader(str(tmp_path)), no_dist=True)
    assert target["lm_head.weight"].tolist() == shared.tolist() == target["embed.weight"].tolist()


@pytest.mark.parametrize("order", ["same", "reversed"])
def test_plain_buffers_read_by_rank0_and_broadcast_with_checkpoint_dtypes(ranks, tmp_path, order):
    from planner_cases import buffers_state, load_buffers_broadcast

    dcp.save(buffers_state(), storage_writer=SafetensorsWriter(str(tmp_path)), no_dist=True)
    results = ranks(2).run(load_buffers_broadcast, str(tmp_path), order)
    for rank, r in enumerate(results):
        assert r.get("dtypes_ok") and r.get("values_ok"), f"rank {rank}: {r}"
    assert results[0]["bytes_read"] > 0 and results[1]["bytes_read"] == 0  # only rank 0 touches storage


def test_broadcast_with_different_plain_tensors_is_the_same_error_everywhere(ranks, tmp_path):
    from planner_cases import buffers_state, load_buffers_broadcast

    dcp.save(buffers_state(), storage_writer=SafetensorsWriter(str(tmp_path)), no_dist=True)
    for r in ranks(2).run(load_buffers_broadcast, str(tmp_path), "different"):
        messages = {name for name, _ in r["failures"].values()}
        assert messages == {"ConfigurationError"}
        assert all("ranks [1] hold other plain tensors" in m for _, m in r["failures"].values())
