"""What FSDP2 saves loads in transformers unchanged, and transformers' output loads into FSDP2."""

from __future__ import annotations

import json

import pytest
import torch
from hf_cases import (
    load_pretrained_broadcast,
    load_pretrained_into_fsdp,
    load_pretrained_into_meta,
    load_pretrained_plain_into_fsdp,
    save_fsdp_llama,
    tiny_gpt2,
    tiny_llama,
)


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp2_llama_loads_with_from_pretrained_to_identical_logits(ranks, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    ranks(2).run(save_fsdp_llama, str(tmp_path), tied)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # a sharded HF checkpoint
    # Tied weights are written once, as save_pretrained does.
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    if tied:
        assert index["metadata"]["dcp_safetensors"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    reference = tiny_llama(seed=0, tied=tied)
    # config.json and generation_config.json as save_pretrained writes them, field by field.
    reference.save_pretrained(str(tmp_path / "reference"))
    for name in ("config.json", "generation_config.json"):
        ours, theirs = (json.loads((d / name).read_text()) for d in (tmp_path, tmp_path / "reference"))
        assert ours == theirs, (name, {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)})
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, reference(idx).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_output_loads_into_fsdp2(ranks, tmp_path, tied):
    reference = tiny_llama(seed=0, tied=tied)
    reference.save_pretrained(str(tmp_path), max_shard_size="100KB")
    if tied:
        assert "lm_head.weight" not in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(idx).logits
    for logits in ranks(2).run(load_pretrained_into_fsdp, str(tmp_path), tied):
        assert torch.equal(logits, expected)


# --- tied embeddings saved once by save_pretrained, loaded with DCP's own planner ----------


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(
    "build", [lambda: tiny_llama(seed=0, tied=True), lambda: tiny_gpt2(seed=0)], ids=["llama", "gpt2-transformer.wte"]
)
def test_tied_save_pretrained_loads_with_dcps_own_planner(tmp_path, build):
    import torch.distributed.checkpoint as dcp

    import dcp_safetensors
    from dcp_safetensors import SafetensorsReader

    reference = build()
    reference.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert "lm_head.weight" not in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    expected = reference.state_dict()
    # One tensor per key, so lm_head.weight can only get its values from the embedding's bytes.
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp.load(target, storage_reader=SafetensorsReader(str(tmp_path)), no_dist=True)
    assert all(torch.equal(_as_bytes(target[k]), _as_bytes(v)) for k, v in expected.items())
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp_safetensors.load(target, str(tmp_path))
    assert all(torch.equal(_as_bytes(target[k]), _as_bytes(v)) for k, v in expected.items())


def test_tied_save_pretrained_loads_with_dcps_own_planner_on_fsdp2(ranks, tmp_path):
    tiny_llama(seed=0, tied=True).save_pretrained(str(tmp_path), max_shard_size="100KB")
    for rank, matches in enumerate(ranks(2).run(load_pretrained_plain_into_fsdp, str(tmp_path))):
        assert "lm_head.weight" in matches and all(matches.values()), (rank, matches)


def test_tie_the_reader_cannot_confirm_is_our_error_naming_the_fix(tmp_path):
    import torch.distributed.checkpoint as dcp

    import dcp_safetensors
    from dcp_safetensors import SafetensorsReader
    from dcp_safetensors.errors import CheckpointMismatchError

    reference = tiny_llama(seed=0, tied=True)
    reference.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").unlink()  # nothing left says the embeddings are tied
    expected = reference.state_dict()
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    with pytest.raises(dcp.api.CheckpointException) as info:
        dcp.load(target, storage_reader=SafetensorsReader(str(tmp_path)), no_dist=True)
    ((error, _),) = info.value.failures.values()
    assert isinstance(error, CheckpointMismatchError)
    message = str(error)
    assert "no tensor 'lm_head.weight', which may be tied to 'model.embed_tokens.weight'" in message
    assert f"{tmp_path}/config.json does not exist" in message
    assert "config.json (it sets tie_word_embeddings)" in message and "model.tie_weights()" in message
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        dcp_safetensors.load(target, str(tmp_path))
    # allow_partial_load skips it, as it skips a key the checkpoint lacks.
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
    dcp.load(target, storage_reader=SafetensorsReader(str(tmp_path)), planner=planner, no_dist=True)
    assert not target["lm_head.weight"].any()
    assert all(torch.equal(target[k], v) for k, v in expected.items() if k != "lm_head.weight")
    # A target whose keys share one tensor says it is tied: it loads through the embedding.
    tied = tiny_llama(seed=1, tied=True).state_dict()
    dcp_safetensors.load(tied, str(tmp_path))
    assert all(torch.equal(tied[k], v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("config", "dtype"), [(True, "float32"), (False, "float32"), (True, "bfloat16")],
    ids=["config", "no-config", "replaced-dtype"],
)
def test_tied_save_pretrained_loads_with_rank0_broadcast(ranks, tmp_path, config, dtype):
    tiny_llama(seed=0, tied=True).save_pretrained(str(tmp_path))
    if not config:
        (tmp_path / "config.json").unlink()
    for rank, result in enumerate(ranks(2).run(load_pretrained_broadcast, str(tmp_path), dtype)):
        assert all(result.values()), (rank, result)


@pytest.mark.parametrize("planner", ["dcp", "ours", "broadcast"])
def test_tied_save_pretrained_loads_into_meta_placeholders(ranks, tmp_path, planner):
    tiny_llama(seed=0, tied=True).save_pretrained(str(tmp_path))
    assert all(ranks(2).run(load_pretrained_into_meta, str(tmp_path), planner))


def test_cpu_offloaded_model_saves_its_real_weights(tmp_path):
    """accelerate's cpu_offload leaves parameters on meta; the resolver reads its hooks' weights_map."""
    import torch.distributed.checkpoint as dcp
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    from dcp_safetensors import SafetensorsSavePlanner, SafetensorsWriter
    from dcp_safetensors.offload import accelerate_resolver

    model = tiny_llama(seed=0)
    cpu_offload(model, execution_device="cpu")
    state = model.state_dict()
    assert any(t.is_meta for t in state.values())
    with pytest.raises(dcp.api.CheckpointException, match="meta device"):
        dcp.save(state, storage_writer=SafetensorsWriter(str(tmp_path)), planner=SafetensorsSavePlanner(), no_dist=True)
    planner = SafetensorsSavePlanner(meta_resolver=accelerate_resolver(model))
    dcp.save(state, storage_writer=SafetensorsWriter(str(tmp_path), hf_config=model.config), planner=planner, no_dist=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, tiny_llama(seed=0)(idx).logits)


def test_distcp_from_fsdp2_converts_to_a_checkpoint_from_pretrained_loads(ranks, tmp_path):
    import subprocess
    import sys

    from hf_cases import save_fsdp_llama_distcp
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "distcp", tmp_path / "hf"
    ranks(2).run(save_fsdp_llama_distcp, str(src))
    cli = [sys.executable, "-m", "dcp_safetensors.cli", "convert", str(src), str(dst), "--max-shard-size", "100KB"]
    proc = subprocess.run([*cli, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tiny_llama(seed=0).config.save_pretrained(str(dst))
    loaded = AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, tiny_llama(seed=0)(idx).logits)
