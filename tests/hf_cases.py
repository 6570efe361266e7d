"""Per-rank cases with transformers models built from small configs (no downloads)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dcp_safetensors


def tiny_llama(seed: int, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_fsdp_llama(path: str, tied: bool = False) -> None:
    model = tiny_llama(seed=0, tied=tied)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp_safetensors.save(get_model_state_dict(model), path, hf_config=model.config, max_shard_size="100KB")


def load_pretrained_into_fsdp(path: str, tied: bool = False) -> torch.Tensor:
    """Load a save_pretrained directory into a differently initialised FSDP2 Llama; return its logits."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    model = tiny_llama(seed=1, tied=tied)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sd = get_model_state_dict(model)
    dcp_safetensors.load(sd, path)
    set_model_state_dict(model, sd)
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(idx).logits


def save_fsdp_llama_distcp(path: str) -> None:
    """An FSDP2 Llama saved in torch's own .distcp format (FileSystemWriter)."""
    import torch.distributed.checkpoint as dcp

    model = tiny_llama(seed=0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp.save(get_model_state_dict(model), storage_writer=dcp.FileSystemWriter(path))
