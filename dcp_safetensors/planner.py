"""Save and load planners: key mapping, dtype on save and on load, meta tensors.

``SafetensorsSavePlanner`` and ``SafetensorsLoadPlanner`` subclass DCP's
default planners and change only what the key and tensor semantics need; pass
them as ``dcp.save(..., planner=...)`` / ``dcp.load(..., planner=...)``.

Example:
    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> from dcp_safetensors import SafetensorsWriter, SafetensorsReader
    >>> from dcp_safetensors.mapping import KeyMapping
    >>> path = tempfile.mkdtemp()
    >>> planner = SafetensorsSavePlanner(mapping=KeyMapping(strip_prefix="model"), dtype=torch.bfloat16)
    >>> _ = dcp.save({"model.w": torch.ones(2), "model.ids": torch.arange(2)},
    ...              storage_writer=SafetensorsWriter(path), planner=planner)
    >>> from dcp_safetensors import read_checkpoint
    >>> sorted((k, v.dtype) for k, v in read_checkpoint(path).tensors.items())
    [('ids', 'I64'), ('w', 'BF16')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.tensor import DTensor

from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.mapping import KeyMapping

__all__ = ["SafetensorsSavePlanner", "SafetensorsLoadPlanner", "MetaResolver"]

ALIASES_KEY = "__dcp_safetensors_aliases__"
"""Key in ``SavePlan.planner_data`` carrying ``{dropped tied key: kept key}`` to the writer's ``finish``."""

MetaResolver = Callable[[str, torch.Tensor], torch.Tensor]
"""``resolver(key, meta_tensor) -> tensor`` supplying the data of a tensor left on the ``meta`` device."""


def _rename(planner: Any, mapping: KeyMapping) -> None:
    """Rename the planner's flattened state dict (and DCP's flatten mappings) to checkpoint names."""
    if mapping.is_identity:
        return
    names = mapping.names(planner.state_dict)
    planner.state_dict = {names[k]: v for k, v in planner.state_dict.items() if k in names}
    if getattr(planner, "flatten_state_dict", False):
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


def _is_meta(value: Any) -> bool:
    if isinstance(value, DTensor):
        return value.to_local().is_meta
    return isinstance(value, torch.Tensor) and value.is_meta


class SafetensorsSavePlanner(DefaultSavePlanner):
    """DCP's default save planner plus key rules, a dtype cast and meta-tensor handling.

    Args:
        mapping: which keys to save and under which names (:class:`KeyMapping`).
        dtype: cast floating tensors to this dtype while writing (e.g. fp32
            master weights -> bf16 files), chunk by chunk, never a full-model
            copy; integer and bool tensors are written unchanged.
        meta_resolver: ``resolver(key, meta_tensor) -> tensor`` supplying the
            data of tensors on the ``meta`` device (e.g. from an offload map).
            Without it a meta tensor is an error listing every such key.
        **kwargs: ``DefaultSavePlanner``'s arguments.
    """

    def __init__(
        self,
        *,
        mapping: KeyMapping | None = None,
        dtype: torch.dtype | None = None,
        meta_resolver: MetaResolver | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating dtype to cast floating tensors to, got {dtype}")
        self.mapping = mapping or KeyMapping()
        self.dtype = dtype
        self.meta_resolver = meta_resolver

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        meta = sorted(k for k, v in self.state_dict.items() if _is_meta(v))
        if meta and self.meta_resolver is None:
            raise ConfigurationError(
                f"{len(meta)} tensors are on the meta device and have no data to save: {', '.join(meta[:20])}"
                f"{' ...' if len(meta) > 20 else ''}; pass meta_resolver= (e.g. for accelerate's CPU offload)"
            )
        for key in meta:
            value = self.state_dict[key]
            resolved = self.meta_resolver(key, value)  # type: ignore[misc]
            if tuple(resolved.shape) != tuple(value.shape) or resolved.dtype != value.dtype or resolved.is_meta:
                raise ConfigurationError(
                    f"meta_resolver returned {resolved.dtype} {list(resolved.shape)} on {resolved.device} for "
                    f"{key!r}, a {value.dtype} {list(value.shape)} tensor"
                )
            self.state_dict[key] = resolved
        _rename(self, self.mapping)
        # Tied tensors (one Parameter under two keys) are written once, as save_pretrained
        # does; the dropped keys are recorded in the index and restored by the reader.
        self.aliases = tied_keys(self.state_dict)
        for alias in self.aliases:
            del self.state_dict[alias]

    def _cast(self, item: WriteItem) -> WriteItem:
        td = item.tensor_data
        if td is None or not td.properties.dtype.is_floating_point or self.dtype is None:
            return item
        properties = dataclasses.replace(td.properties, dtype=self.dtype)
        return dataclasses.replace(item, tensor_data=dataclasses.replace(td, properties=properties))

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        if self.dtype is not None:
            plan = dataclasses.replace(plan, items=[self._cast(i) for i in plan.items])
        if self.aliases:
            # DCP merges every rank's planner_data into the global Metadata handed to finish().
            plan = dataclasses.replace(plan, planner_data={**(plan.planner_data or {}), ALIASES_KEY: self.aliases})
        self.plan = plan
        return plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        if self.dtype is not None and isinstance(data, torch.Tensor) and data.is_floating_point():
            data = data.to(self.dtype)
        return data


class SafetensorsLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner plus key rules and an explicit dtype policy.

    Args:
        mapping: the same rules as on save: each target key is looked up under
            its checkpoint name; keys the rules leave out are not loaded.
        dtype_policy: what a dtype difference between checkpoint and target
            does: ``"error"`` (default) raises naming every such key;
            ``"cast"`` converts into the target's dtype. A target's dtype never
            changes silently.
        **kwargs: ``DefaultLoadPlanner``'s arguments (``allow_partial_load``, ...).
    """

    def __init__(
        self, *, mapping: KeyMapping | None = None, dtype_policy: Literal["error", "cast"] = "error", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if dtype_policy not in ("error", "cast"):
            raise ConfigurationError(f"dtype_policy must be 'error' or 'cast', got {dtype_policy!r}")
        self.mapping = mapping or KeyMapping()
        self.dtype_policy = dtype_policy

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        _rename(self, self.mapping)
        if metadata is not None:
            # A tied target key the checkpoint lacks (save_pretrained drops lm_head.weight when
            # tie_word_embeddings=True) is filled through the memory it shares with its twin.
            present = metadata.state_dict_metadata
            for alias, kept in tied_keys(self.state_dict).items():
                if alias not in present and kept in present:
                    del self.state_dict[alias]
                elif kept not in present and alias in present:
                    del self.state_dict[kept]
        if self.dtype_policy == "error" and metadata is not None:
            clashes = []
            for key, value in self.state_dict.items():
                md = metadata.state_dict_metadata.get(key)
                if isinstance(md, TensorStorageMetadata) and isinstance(value, torch.Tensor):
                    if md.properties.dtype != value.dtype:
                        clashes.append(f"{key} ({md.properties.dtype} in the checkpoint, {value.dtype} in the target)")
            if clashes:
                raise ConfigurationError(
                    f"dtype differs for {len(clashes)} tensors: {'; '.join(clashes[:10])}"
                    f"{' ...' if len(clashes) > 10 else ''}; pass dtype_policy='cast' to convert"
                )
