"""Per-rank cases for fused MoE experts: transformers' Qwen3-MoE under FSDP2, and EP-sharded DTensors."""

from __future__ import annotations

import torch
import torch.distributed as dist
from helpers import fsdp_layers, world_mesh
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dcp_safetensors
from dcp_safetensors import SafetensorsLoadPlanner, SafetensorsSavePlanner
from dcp_safetensors.experts import ExpertSplit, FusedExperts

# gpt-oss's layout: gate_up_proj [E, H, 2I] with gate/up interleaved in the last dim,
# down_proj [E, I, H]; per-expert keys stored as nn.Linear weights (transposed).
TRANSPOSED_INTERLEAVED = (
    FusedExperts(
        "{prefix}.experts.gate_up_proj",
        (
            ExpertSplit("{prefix}.experts.{e}.gate_proj.weight", dim=1, parts=2, part=0, interleaved=True, transpose=True),
            ExpertSplit("{prefix}.experts.{e}.up_proj.weight", dim=1, parts=2, part=1, interleaved=True, transpose=True),
        ),
    ),
    FusedExperts("{prefix}.experts.down_proj", (ExpertSplit("{prefix}.experts.{e}.down_proj.weight", transpose=True),)),
)


def tiny_qwen3_moe(seed: int, experts: int = 6):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=experts,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).eval()


# Tiny configs of every architecture a shipped rule set claims, and gpt-oss (experts stored fused).
_COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
_MLA = dict(q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
_ARCHITECTURES = {
    "qwen2_moe": ("Qwen2Moe", dict(intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=4)),
    "qwen3_moe": ("Qwen3Moe", dict(intermediate_size=24, moe_intermediate_size=8, num_experts=4, head_dim=8)),
    "deepseek_v2": ("DeepseekV2", dict(intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, **_MLA)),
    "deepseek_v3": (
        "DeepseekV3",
        dict(intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, **_MLA),
    ),
    "olmoe": ("Olmoe", dict(intermediate_size=8, num_experts=4, eos_token_id=None)),
    "glm4_moe": ("Glm4Moe", dict(intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, head_dim=8)),
    "mixtral": ("Mixtral", dict(intermediate_size=8, num_local_experts=4)),
    "minimax": ("MiniMax", dict(intermediate_size=8, num_local_experts=4, head_dim=8, layer_types=["full_attention", "linear_attention"])),
    "gpt_oss": ("GptOss", dict(intermediate_size=8, num_local_experts=4, head_dim=8)),
}


def tiny_moe(architecture: str, seed: int):
    """A transformers MoE model of ``architecture`` (a key of ``_ARCHITECTURES``): 4 experts, hidden 16."""
    import transformers

    name, options = _ARCHITECTURES[architecture]
    config = getattr(transformers, f"{name}Config")(**_COMMON, num_experts_per_tok=2, **options)
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def moe_logits(model) -> torch.Tensor:
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(idx).logits


def save_fsdp_moe(path: str) -> None:
    model = fsdp_layers(tiny_qwen3_moe(seed=0))
    dcp_safetensors.save(
        get_model_state_dict(model),
        path,
        planner=SafetensorsSavePlanner(hf_experts=True),
        hf_config=model.config,
        max_shard_size="40KB",
    )


def load_into_fsdp_moe(path: str) -> dict[str, bool]:
    """Load per-expert keys into a differently initialised FSDP2 Qwen3-MoE (fused experts).

    Returns, per parameter, whether it now equals the seed-0 model's exactly.
    """
    model = fsdp_layers(tiny_qwen3_moe(seed=1))
    sd = get_model_state_dict(model)
    dcp_safetensors.load(sd, path, planner=SafetensorsLoadPlanner(hf_experts=True))
    set_model_state_dict(model, sd)
    expected = tiny_qwen3_moe(seed=0).state_dict()
    return {k: torch.equal(v.full_tensor(), expected[k]) for k, v in get_model_state_dict(model).items()}


def fused_reference(experts: int = 6, hidden: int = 8, inter: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "layers.0.mlp.experts.gate_up_proj": torch.randn(experts, 2 * inter, hidden, generator=g),
        "layers.0.mlp.experts.down_proj": torch.randn(experts, hidden, inter, generator=g),
        "layers.0.mlp.gate.weight": torch.randn(experts, hidden, generator=g),
    }


def _placed(full: dict[str, torch.Tensor], mesh, placements) -> dict[str, DTensor]:
    return {k: distribute_tensor(v, mesh, placements) for k, v in full.items()}


def save_ep_sharded(path: str, transposed: bool = False) -> None:
    """Experts over a 2 (EP) x 2 (FSDP) mesh: Shard(0) on the expert dim, Shard(1) within."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "fsdp"))
    full = fused_reference()
    if transposed:
        full = {k: v.transpose(1, 2).contiguous() if "experts" in k else v for k, v in full.items()}
    rules = TRANSPOSED_INTERLEAVED if transposed else True
    planner = SafetensorsSavePlanner(hf_experts=rules)
    dcp_safetensors.save(_placed(full, mesh, [Shard(0), Shard(1)]), path, planner=planner)


def load_ep_uneven(path: str, transposed: bool = False) -> dict[str, bool]:
    """Load into 6 experts over 4 ranks, Shard(0): 2, 2, 2 and 0 experts; compare with the reference."""
    mesh = world_mesh()
    full = fused_reference()
    if transposed:
        full = {k: v.transpose(1, 2).contiguous() if "experts" in k else v for k, v in full.items()}
    target = _placed({k: torch.zeros_like(v) for k, v in full.items()}, mesh, [Shard(0)])
    rules = TRANSPOSED_INTERLEAVED if transposed else True
    planner = SafetensorsLoadPlanner(hf_experts=rules)
    dcp_safetensors.load(target, path, planner=planner)
    return {k: torch.equal(target[k].full_tensor(), full[k]) for k in full}


def _from_local_2_3(full: torch.Tensor) -> DTensor:
    """5 experts on 2 ranks as 2 + 3 (torch.chunk's split is 3 + 2), made with DTensor.from_local."""
    mesh = init_device_mesh("cpu", (2,))
    local = full[:2] if dist.get_rank() == 0 else full[2:]
    return DTensor.from_local(local, mesh, [Shard(0)], shape=full.shape, stride=full.stride())


def uneven_from_local(path: str) -> dict[str, tuple[str, str]]:
    """Save and load experts laid out 2 + 3 with from_local: the (type, message) each raises."""
    full = fused_reference(experts=5)
    dcp_safetensors.save(full, f"{path}/per_expert", planner=SafetensorsSavePlanner(hf_experts=True))
    dcp_safetensors.save(full, f"{path}/fused")
    uneven = {k: _from_local_2_3(v) for k, v in full.items()}
    calls = {
        "save": lambda: dcp_safetensors.save(uneven, f"{path}/uneven", planner=SafetensorsSavePlanner(hf_experts=True)),
        "load per-expert": lambda: dcp_safetensors.load(uneven, f"{path}/per_expert", planner=SafetensorsLoadPlanner(hf_experts=True)),
        "load fused": lambda: dcp_safetensors.load(uneven, f"{path}/fused"),
    }
    out = {}
    for what, call in calls.items():
        try:
            call()
            out[what] = ("no error", "")
        except Exception as e:  # noqa: BLE001 - the test checks the type
            out[what] = (type(e).__name__, str(e))
    return out
