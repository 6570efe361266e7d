"""Per-rank cases with transformers models built from small configs (no downloads)."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from helpers import fsdp_layers
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import dcp_safetensors
from dcp_safetensors import SafetensorsLoadPlanner, SafetensorsReader


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


def tiny_gpt2(seed: int):
    """A tied model whose embedding is not under ``model.``: ``lm_head.weight`` <- ``transformer.wte.weight``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def save_fsdp_llama(path: str, tied: bool = False) -> None:
    model = fsdp_layers(tiny_llama(seed=0, tied=tied))
    assert type(model).__name__ == "FSDPLlamaForCausalLM"  # config.json must name LlamaForCausalLM all the same
    dcp_safetensors.save(get_model_state_dict(model), path, hf_config=model, max_shard_size="100KB")


def load_pretrained_into_fsdp(path: str, tied: bool = False) -> torch.Tensor:
    """Load a save_pretrained directory into a differently initialised FSDP2 Llama; return its logits."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    model = fsdp_layers(tiny_llama(seed=1, tied=tied))
    sd = get_model_state_dict(model)
    dcp_safetensors.load(sd, path)
    set_model_state_dict(model, sd)
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(idx).logits


def save_fsdp_llama_distcp(path: str) -> None:
    """An FSDP2 Llama saved in torch's own .distcp format (FileSystemWriter)."""
    import torch.distributed.checkpoint as dcp

    model = fsdp_layers(tiny_llama(seed=0))
    dcp.save(get_model_state_dict(model), storage_writer=dcp.FileSystemWriter(path))


# --- tied embeddings a save_pretrained wrote once, loaded without our planner ------------


def load_pretrained_plain_into_fsdp(path: str) -> dict[str, bool]:
    """DCP's own planner loads a tied save_pretrained directory into a tied FSDP2 Llama; per key, whether this rank's shard matches."""
    from cases import local_matches

    model = fsdp_layers(tiny_llama(seed=1, tied=True))
    sd = get_model_state_dict(model)
    dcp.load(sd, storage_reader=SafetensorsReader(path))
    reference = tiny_llama(seed=0, tied=True).state_dict()
    return {k: local_matches(v, reference[k]) for k, v in sd.items()}


def load_pretrained_broadcast(path: str, dtype: str) -> dict[str, bool]:
    """Rank 0 reads a tied save_pretrained directory and broadcasts it into a tied (unsharded) Llama of ``dtype``."""
    from cases import as_bytes

    sd = tiny_llama(seed=1, tied=True).to(getattr(torch, dtype)).state_dict()
    planner = SafetensorsLoadPlanner(broadcast_from_rank0=True, dtype_policy="cast")
    dcp.load(sd, storage_reader=SafetensorsReader(path), planner=planner)
    reference = tiny_llama(seed=0, tied=True).state_dict()
    return {
        "values": all(torch.equal(as_bytes(sd[k]), as_bytes(v)) for k, v in reference.items()),
        "still tied": sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr(),
    }


def load_pretrained_into_meta(path: str, planner: str) -> bool:
    """Meta placeholders of a tied Llama's keys (two tensors, no tie to see) load both keys' values."""
    from cases import as_bytes

    target = {k: torch.empty_like(v, device="meta") for k, v in tiny_llama(seed=1, tied=True).state_dict().items()}
    if planner == "dcp":
        dcp.load(target, storage_reader=SafetensorsReader(path))
    else:
        dcp_safetensors.load(target, path, planner=SafetensorsLoadPlanner(broadcast_from_rank0=planner == "broadcast"))
    reference = tiny_llama(seed=0, tied=True).state_dict()
    return all(torch.equal(as_bytes(target[k]), as_bytes(v)) for k, v in reference.items())


# --- torch's own per-rank HF output (HuggingFaceStorageWriter(save_distributed=True)) ------


def save_fsdp_llama_torch_per_rank(path: str) -> None:
    """An FSDP2 Llama saved by torch's HF writer, every rank its own files, in two files per rank, no index."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model = fsdp_layers(tiny_llama(seed=0))
    sd = get_model_state_dict(model)
    mapping = {k: 1 if k.startswith("model.layers.0.") else 2 for k in sd}
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(path, fqn_to_index_mapping=mapping, save_distributed=True))


def load_torch_per_rank_resharded(path: str, how: str) -> dict[str, bool]:
    """Load torch's per-rank files into a zeroed state sharded another way: ``plain`` (DCP's own planner,
    column shards), ``ours`` (dcp_safetensors.load into FSDP2 shards); per key, whether this rank's part matches."""
    from cases import local_matches
    from helpers import world_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    reference = tiny_llama(seed=0).state_dict()
    if how == "plain":
        mesh = world_mesh()
        sd = {
            k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(v.dim() - 1) if v.dim() == 2 else Replicate()])
            for k, v in reference.items()
        }
        dcp.load(sd, storage_reader=SafetensorsReader(path))
    else:
        sd = get_model_state_dict(fsdp_layers(tiny_llama(seed=1)))
        dcp_safetensors.load(sd, path)
    return {k: local_matches(v, reference[k]) for k, v in sd.items()}
