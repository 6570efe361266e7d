"""What both planners check and change in the caller's state dict before planning.

Refusals of what DCP cannot checkpoint (:func:`refuse_partial`,
:func:`refuse_misplaced`), meta tensors (:func:`is_meta`), tensors tied under
two keys (:func:`tied_keys`), and renaming the flattened state dict to the
checkpoint's names (:func:`rename_keys`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list
from torch.distributed.tensor import DTensor

from dcp_safetensors.errors import ConfigurationError

__all__ = ["rename_keys", "tied_keys", "is_meta", "refuse_partial", "refuse_misplaced"]


def rename_keys(planner: DefaultSavePlanner | DefaultLoadPlanner, names: dict[str, str]) -> None:
    """Rename the planner's flattened state dict (and DCP's flatten mappings) to ``names``; keys without one go."""
    planner.state_dict = {names[k]: v for k, v in planner.state_dict.items() if k in names}
    if planner.flatten_state_dict:
        planner.mappings = {names[k]: path for k, path in planner.mappings.items() if k in names}


def _storage_key(value: Any) -> tuple[Any, ...] | None:
    """Identity of the memory a tensor views: equal keys mean tied tensors (one Parameter, two keys)."""
    local = value.to_local() if isinstance(value, DTensor) else value
    if not isinstance(local, torch.Tensor) or local.is_meta or local.numel() == 0:
        return None
    return (
        local.device,
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        tuple(local.stride()),
        local.dtype,
    )


def tied_keys(state_dict: dict[str, Any]) -> dict[str, str]:
    """``{alias: first key}`` for every key whose tensor views the same memory as an earlier key's.

    Example:
        >>> w = torch.ones(2)
        >>> tied_keys({"embed.weight": w, "other": torch.ones(2), "lm_head.weight": w})
        {'lm_head.weight': 'embed.weight'}
    """
    first: dict[tuple[Any, ...], str] = {}
    aliases = {}
    for key, value in state_dict.items():
        ident = _storage_key(value)
        if ident is None:
            continue
        kept = first.setdefault(ident, key)
        if kept != key:
            aliases[key] = kept
    return aliases


def is_meta(value: Any) -> bool:
    if isinstance(value, DTensor):
        return value.to_local().is_meta
    return isinstance(value, torch.Tensor) and value.is_meta


def refuse_partial(state_dict: dict[str, Any], what: str) -> None:
    """A Partial DTensor holds one addend per rank: writing or filling any one rank's would be wrong."""
    partial = sorted(k for k, v in state_dict.items() if isinstance(v, DTensor) and any(p.is_partial() for p in v.placements))
    if partial:
        raise ConfigurationError(
            f"cannot {what} {len(partial)} DTensors with a Partial placement (a pending reduction): "
            f"{', '.join(repr(k) for k in partial[:10])}{' ...' if len(partial) > 10 else ''}; "
            "reduce them first, e.g. t.redistribute(t.device_mesh, [Replicate()])"
        )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def refuse_misplaced(state_dict: dict[str, Any], what: str) -> None:
    """A DTensor whose local shard is not where its placements put it would be saved or filled at wrong offsets.

    DCP places every shard by ``compute_local_shape_and_global_offset``, i.e.
    torch.chunk's split of the global shape; ``DTensor.from_local(..., shape=,
    stride=)`` accepts other local sizes (5 experts as 2 + 3), which no
    placement describes and DCP cannot see.
    """
    for key, value in state_dict.items():
        if not isinstance(value, DTensor) or value.device_mesh.get_coordinate() is None:
            continue
        local = tuple(value.to_local().shape)
        (chunk,) = _create_chunk_list(value)
        if tuple(chunk.sizes) != local:
            raise ConfigurationError(
                f"cannot {what} DTensor {key!r} on rank {_rank()}: its local shard is {list(local)}, but its "
                f"placements {list(value.placements)} put {list(chunk.sizes)} at offset {list(chunk.offsets)} of "
                f"the global {list(value.shape)} on this rank (torch.chunk's split), and DCP places every shard by "
                "those; local sizes of another split (DTensor.from_local(..., shape=, stride=)) cannot be "
                "checkpointed: lay the tensor out as torch.chunk splits it, e.g. "
                "distribute_tensor(t.full_tensor(), mesh, placements)"
            )
