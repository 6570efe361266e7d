"""The save planner: key rules, a dtype cast, meta tensors, tied keys and fused experts on save.

:class:`SafetensorsSavePlanner` subclasses DCP's ``DefaultSavePlanner``; the
coordinator's global step is :mod:`dcp_safetensors.global_plan`'s, with the
plan cache of :mod:`dcp_safetensors.plan_cache`. Tied keys dropped from the
plan reach the writer's ``finish`` under :data:`ALIASES_KEY`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.tensor import DTensor

from dcp_safetensors.agreement import describe
from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.experts import FusedExperts, block_renames, layout_conflict, resolve_rules
from dcp_safetensors.global_plan import PlannedSave, build_metadata, collect_chunks, validate
from dcp_safetensors.mapping import KeyMapping
from dcp_safetensors.plan_cache import GlobalRecord, LocalPlanData, SaveCache, expand_local_plans
from dcp_safetensors.planner.fused import FusedSource, PieceKey, local_pieces, match_fused
from dcp_safetensors.planner.state_dict import (
    is_meta,
    refuse_misplaced,
    refuse_partial,
    rename_keys,
    tied_keys,
)

__all__ = ["SafetensorsSavePlanner", "MetaResolver", "ALIASES_KEY"]

ALIASES_KEY = "__dcp_safetensors_aliases__"
"""Key in ``SavePlan.planner_data`` carrying ``{dropped tied key: kept key}`` to the writer's ``finish``."""


MetaResolver = Callable[[str, torch.Tensor], torch.Tensor]
"""``resolver(key, meta_tensor) -> tensor`` supplying the data of a tensor left on the ``meta`` device."""


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
        hf_experts: write fused MoE expert parameters as per-expert keys:
            ``True`` for transformers' layout (``experts.gate_up_proj`` ->
            ``experts.{e}.gate_proj.weight`` / ``up_proj``, ``experts.down_proj``
            -> ``experts.{e}.down_proj.weight``, as ``save_pretrained`` writes
            them), or a sequence of :class:`~dcp_safetensors.experts.FusedExperts`
            rules. Each rank writes the experts (or expert slices) it holds.
        strict: a ``hf_experts`` rule that matches no key is an error (by
            default a warning).
        enable_plan_caching: reuse the last save's plans when no rank's plan
            changed (same keys, dtypes, shapes, chunks, options): ranks send a
            digest instead of their plan and the coordinator skips planning.
            The cache lives on this planner, so keep one planner per rank and
            pass it to every save (:mod:`dcp_safetensors.plan_cache`).
        **kwargs: ``DefaultSavePlanner``'s arguments.

    The coordinator's global step is near-linear in the number of chunks
    (:mod:`dcp_safetensors.global_plan`): dedup, DCP's metadata and an exact
    check that every tensor's chunks tile it, without pairwise sweeps.
    """

    def __init__(
        self,
        *,
        mapping: KeyMapping | None = None,
        dtype: torch.dtype | None = None,
        meta_resolver: MetaResolver | None = None,
        hf_experts: bool | Sequence[FusedExperts] = False,
        strict: bool = False,
        enable_plan_caching: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(enable_plan_caching=False, **kwargs)
        caching = enable_plan_caching
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating dtype to cast floating tensors to, got {dtype}")
        self.mapping = mapping or KeyMapping()
        self.dtype = dtype
        self.meta_resolver = meta_resolver
        self.expert_rules = resolve_rules(hf_experts)
        self.strict = strict
        self._pieces: dict[PieceKey, torch.Tensor] = {}
        # Our own cache on this instance (plan_cache.py), not DCP's class-level one: DCP
        # compares plans without their dtypes.
        self.cache = SaveCache() if caching else None

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        # Every check below runs on what is saved: keys the mapping leaves out are never
        # refused, resolved or written. Messages and the resolver use the caller's keys.
        names = self.mapping.names(self.state_dict)
        saved = {key: self.state_dict[key] for key in names}
        refuse_partial(saved, "save")
        refuse_misplaced(saved, "save")
        meta = sorted(k for k, v in saved.items() if is_meta(v))
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
        if not self.mapping.is_identity:
            rename_keys(self, names)
        fused = match_fused(self.expert_rules, self.state_dict, self.strict)
        conflict = layout_conflict((key, rule, prefix, tuple(self.state_dict[key].shape)) for key, (rule, prefix) in fused.items())
        if conflict:
            raise ConfigurationError(
                f"hf_experts: these fused experts are not in the layout the rules describe: {conflict}; "
                "splitting them would cut the wrong axis. transformers stores such experts fused (gpt-oss's "
                "gate_up_proj [E, H, 2I]) and save_pretrained writes them as they are: save without hf_experts, "
                "or pass FusedExperts rules for this layout (dcp_safetensors.experts)"
            )
        renames = block_renames(fused, self.state_dict)
        if renames:
            rename_keys(self, KeyMapping(rename=renames).names(self.state_dict))
        # Tied tensors (one Parameter under two keys) are written once, as save_pretrained
        # does; the dropped keys are recorded in the index and restored by the reader.
        self.aliases = tied_keys(self.state_dict)
        for alias in self.aliases:
            del self.state_dict[alias]
        self._pieces = {}
        for key, (rule, prefix) in fused.items():
            if key in self.aliases:  # written through its twin
                continue
            tensor = self.state_dict[key]
            pieces = local_pieces(key, rule, prefix, tensor)
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            self.state_dict[key] = FusedSource(pieces, TensorProperties.create_from_tensor(local))
            self._pieces.update(((p.name, p.offsets), view) for p, view in pieces)

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
        if self.cache is not None:
            return self.cache.offer(plan, self.options())
        return dataclasses.replace(plan, planner_data=LocalPlanData(self.options(), planner_data=plan.planner_data))

    def options(self) -> dict[str, Any]:
        """The options that shape a plan, as every rank must pass them (compared by the coordinator).

        Not ``meta_resolver``: it only supplies this rank's meta tensors, so a
        rank without any may leave it out.
        """
        return describe({
            "mapping": self.mapping, "dtype": self.dtype,
            "hf_experts": self.expert_rules, "strict": self.strict, "enable_plan_caching": self.cache is not None,
            "dedup_save_to_lowest_rank": self.dedup_save_to_lowest_rank,
            "flatten_state_dict": self.flatten_state_dict, "flatten_sharded_tensors": self.flatten_sharded_tensors,
        })

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans, records, confirmed = expand_local_plans(all_plans, self.cache)
        if confirmed is not None:  # no rank's plan changed: the last global step holds
            plans, metadata, table = confirmed.plans, confirmed.metadata, confirmed.table
        else:
            plans, table, md = collect_chunks(plans, self.dedup_save_to_lowest_rank)
            validate(table, md)
            metadata = build_metadata(plans, md)
        if self.cache is not None:
            self.cache.keep_global(GlobalRecord(records, plans, metadata, table), reused=confirmed is not None)
        self.global_plan, self.metadata = plans, metadata
        # The writer of this save (on this coordinator) takes what the planner proved from
        # the first plan, and removes it before the plans are scattered.
        handoff = PlannedSave(table, self.cache, unchanged=confirmed is not None)
        return [dataclasses.replace(plans[0], planner_data=handoff), *plans[1:]], metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = self.cache.confirm(new_plan) if self.cache is not None else new_plan
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        piece = self._pieces.get((index.fqn, tuple(index.offset or ())))
        return piece if piece is not None else super().lookup_object(index)

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        if self.dtype is not None and isinstance(data, torch.Tensor) and data.is_floating_point():
            data = data.to(self.dtype)
        return data
