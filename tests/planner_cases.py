"""Per-rank cases for the save/load planners and submodule export."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from cases import error_summary
from helpers import ToyModel, WithDraft, fully_shard_units, world_mesh
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

import dcp_safetensors
from dcp_safetensors import (
    KeyMapping,
    SafetensorsLoadPlanner,
    SafetensorsReader,
    SafetensorsSavePlanner,
    SafetensorsWriter,
)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def sharded(module: nn.Module) -> nn.Module:
    """FSDP2 over each child of ``module`` (each element of a ``ModuleList`` child), then the whole."""
    units = [unit for child in module.children() for unit in (child if isinstance(child, nn.ModuleList) else [child])]
    return fully_shard_units(module, units, world_mesh())


def _toy(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return sharded(ToyModel())


def save_renamed_bf16(path: str) -> None:
    sd = get_model_state_dict(_toy(0))
    planner = SafetensorsSavePlanner(
        mapping=KeyMapping(exclude=["norm.*"], rename={"embed.weight": "model.embed_tokens.weight"}), dtype=torch.bfloat16
    )
    dcp.save(sd, storage_writer=SafetensorsWriter(path), planner=planner)


def load_renamed(path: str, policy: str):
    """Load the bf16 save back into fp32 targets under the same rules; return per-key match or the error."""
    reference = get_model_state_dict(_toy(0))
    target = get_model_state_dict(_toy(1))
    norm_before = _local(target["norm.weight"]).clone()
    planner = SafetensorsLoadPlanner(
        mapping=KeyMapping(exclude=["norm.*"], rename={"embed.weight": "model.embed_tokens.weight"}), dtype_policy=policy
    )
    failures = error_summary(dcp.load, target, storage_reader=SafetensorsReader(path), planner=planner)
    if failures:
        return failures
    out = {}
    for key, value in target.items():
        expected = _local(reference[key])
        if expected.is_floating_point():
            expected = expected.to(torch.bfloat16).to(expected.dtype)
        out[key] = torch.equal(_local(value), expected)
    out["norm_untouched"] = torch.equal(_local(target["norm.weight"]), norm_before)
    return out


def export_draft(path: str) -> None:
    torch.manual_seed(0)
    dcp_safetensors.save_submodule(sharded(WithDraft()), "draft", path)


def export_missing(path: str):
    torch.manual_seed(0)
    model = sharded(WithDraft())
    try:
        dcp_safetensors.save_submodule(model, "drafts", path)
    except Exception as e:  # noqa: BLE001 - the test inspects the type
        return type(e).__name__, str(e)
    return None


def load_draft_into_other_sharding(path: str) -> bool:
    """Load the exported draft into the draft of a model sharded over a 1-D mesh of a different seed."""
    torch.manual_seed(5)
    model = sharded(WithDraft())
    full = get_model_state_dict(model)
    target = {k[len("draft.") :]: v for k, v in full.items() if k.startswith("draft.")}
    dcp_safetensors.load(target, path)
    torch.manual_seed(0)
    reference = WithDraft().state_dict()
    return all(torch.equal(v.full_tensor(), reference["draft." + k]) for k, v in target.items())


BUFFER_DTYPES = [torch.bool, torch.int8, torch.int64, torch.float64, torch.float8_e4m3fn, torch.bfloat16]


def buffers_state() -> dict[str, torch.Tensor]:
    from cases import random_tensor

    return {f"buf.{str(dt).split('.')[-1]}": random_tensor((3, 5), dt, 40 + i) for i, dt in enumerate(BUFFER_DTYPES)}


def load_buffers_broadcast(path: str, order: str) -> dict:
    """Targets: meta float32 placeholders for the buffers (wrong dtype on purpose) + a real DTensor weight."""
    from cases import as_bytes

    from dcp_safetensors.storage import local as local_storage

    reads: list[int] = []
    original = local_storage.ReadableFile.readinto  # every read of a load goes through one

    def counting(self, offset, buffer):
        reads.append(memoryview(buffer).nbytes)
        return original(self, offset, buffer)

    local_storage.ReadableFile.readinto = counting
    try:
        keys = sorted(buffers_state(), reverse=(order == "reversed" and dist.get_rank() == 1))
        if order == "different" and dist.get_rank() == 1:
            keys = keys[:-1]
        target = {k: torch.empty(3, 5, device="meta") for k in keys}
        failures = error_summary(
            dcp.load,
            target,
            storage_reader=SafetensorsReader(path, read_threads=1),
            planner=SafetensorsLoadPlanner(broadcast_from_rank0=True),
        )
    finally:
        local_storage.ReadableFile.readinto = original
    if failures:
        return {"failures": failures}
    expected = buffers_state()
    return {
        "dtypes_ok": all(target[k].dtype == expected[k].dtype for k in keys),
        "values_ok": all(torch.equal(as_bytes(target[k]), as_bytes(expected[k])) for k in keys),
        "bytes_read": sum(reads),
    }
