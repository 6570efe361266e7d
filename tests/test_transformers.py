"""What FSDP2 saves loads in transformers unchanged, and transformers' output loads into FSDP2."""

from __future__ import annotations

import json

import pytest
import torch
from hf_cases import load_pretrained_into_fsdp, save_fsdp_llama, tiny_llama


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
