"""What FSDP2 saves loads in transformers unchanged, and transformers' output loads into FSDP2."""

from __future__ import annotations

import json

import torch
from hf_cases import load_pretrained_into_fsdp, save_fsdp_llama, tiny_llama


def test_fsdp2_llama_loads_with_from_pretrained_to_identical_logits(ranks, tmp_path):
    from transformers import AutoModelForCausalLM

    ranks(2).run(save_fsdp_llama, str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # a sharded HF checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    reference = tiny_llama(seed=0)
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, reference(idx).logits)


def test_save_pretrained_output_loads_into_fsdp2(ranks, tmp_path):
    reference = tiny_llama(seed=0)
    reference.save_pretrained(str(tmp_path), max_shard_size="100KB")
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(idx).logits
    for logits in ranks(2).run(load_pretrained_into_fsdp, str(tmp_path)):
        assert torch.equal(logits, expected)
