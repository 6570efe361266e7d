"""Save and load planners: key mapping, dtype on save and on load, meta tensors, fused experts.

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
import difflib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _create_chunk_list,
    _iterate_state_dict,
    create_read_items_for_chunk_list,
)
from torch.distributed.tensor import DTensor

from dcp_safetensors.agreement import check_agreement, describe
from dcp_safetensors.errors import CheckpointMismatchError, ConfigurationError
from dcp_safetensors.experts import (
    ExpertPiece,
    FusedExperts,
    block_renames,
    expert_pieces,
    expert_shape,
    layout_conflict,
    per_expert_hint,
    resolve_rules,
)
from dcp_safetensors.global_plan import PlannedSave, build_metadata, collect_chunks, validate
from dcp_safetensors.mapping import KeyMapping
from dcp_safetensors.plan_cache import GlobalRecord, LocalPlanData, SaveCache, expand_local_plans
from dcp_safetensors.reader import TiedTensorStorageMetadata

logger = logging.getLogger(__name__)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

__all__ = ["SafetensorsSavePlanner", "SafetensorsLoadPlanner", "MetaResolver", "LoadPlanData"]

ALIASES_KEY = "__dcp_safetensors_aliases__"
"""Key in ``SavePlan.planner_data`` carrying ``{dropped tied key: kept key}`` to the writer's ``finish``."""

@dataclasses.dataclass(frozen=True)
class LoadPlanData:
    """``LoadPlan.planner_data`` of our load planner: its options and, when it broadcasts, the plain keys."""

    options: dict[str, Any]
    broadcast_keys: tuple[str, ...] | None = None


def _agree_on_broadcast(declared: Sequence[tuple[str, ...] | None]) -> None:
    """Every rank broadcasts the same plain tensors, or none does; else one error naming the ranks."""
    if all(keys == declared[0] for keys in declared):
        return
    differing = [r for r, keys in enumerate(declared) if keys != declared[0]]
    sets = [set(keys or ()) for keys in declared]
    extra = sorted(set().union(*sets) - set(sets[0]).intersection(*sets[1:]))
    raise ConfigurationError(
        f"broadcast_from_rank0: ranks {differing} hold other plain tensors than rank 0 "
        f"(keys not on every rank: {', '.join(extra[:10])}); every rank must list the same ones"
    )


MetaResolver = Callable[[str, torch.Tensor], torch.Tensor]
"""``resolver(key, meta_tensor) -> tensor`` supplying the data of a tensor left on the ``meta`` device."""


def _rename(planner: Any, names: dict[str, str]) -> None:
    """Rename the planner's flattened state dict (and DCP's flatten mappings) to ``names``; keys without one go."""
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


def _refuse_partial(state_dict: dict[str, Any], what: str) -> None:
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


def _refuse_misplaced(state_dict: dict[str, Any], what: str) -> None:
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


def _meta_on_cpu(state_dict: dict[str, Any]) -> None:
    """Give plain meta targets CPU memory when there is no process group.

    DCP allocates them on its default process group's device, which raises
    "Default process group has not been initialized" in a single process
    (the low-memory path: a model built on ``meta``, loaded without a group).
    """
    if dist.is_available() and dist.is_initialized():
        return

    def on_cpu(value: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(value, device="cpu") if value.is_meta else value

    _iterate_state_dict(state_dict, lambda v: v, lambda v: v, on_cpu)


def _where(metadata: Metadata) -> str:
    return str(metadata.storage_meta.checkpoint_id) if metadata.storage_meta else "the checkpoint"


def _near(key: str, present: Sequence[str]) -> list[str]:
    """Up to three checkpoint keys next to ``key``: the closest under its deepest parent the checkpoint has, else by spelling."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n]) + "."
        under = [k for k in present if k.startswith(head)]
        if under:
            return difflib.get_close_matches(key, under, n=3, cutoff=0)
    return difflib.get_close_matches(key, present, n=3)


# -- fused MoE experts -------------------------------------------------------------------

PieceKey = tuple[str, tuple[int, ...]]


def _match_fused(
    rules: tuple[FusedExperts, ...], state_dict: dict[str, Any], strict: bool
) -> dict[str, tuple[FusedExperts, str]]:
    """``{key: (rule, prefix)}`` for every tensor a fused-expert rule matches.

    A rule that matches no key is likely a typo or the wrong model family: a
    warning, or with ``strict`` an error.
    """
    found = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        for rule in rules:
            prefix = rule.match(key)
            if prefix is not None:
                found[key] = (rule, prefix)
                break
    unused = [r.fused for r in rules if all(rule is not r for rule, _ in found.values())]
    if unused:
        message = f"hf_experts: no key matches {', '.join(repr(u) for u in unused)}"
        if strict:
            raise ConfigurationError(f"{message}; the state dict has {len(state_dict)} keys, e.g. {next(iter(state_dict), None)!r}")
        logger.warning("%s", message)
    return found


def _local_pieces(key: str, rule: FusedExperts, prefix: str, tensor: torch.Tensor) -> list[tuple[ExpertPiece, torch.Tensor]]:
    """The per-expert pieces of ``tensor`` this rank holds, each with a view of its local data."""
    if isinstance(tensor, DTensor):
        if tensor.device_mesh.get_coordinate() is None:  # not on this rank's (pipeline stage's) mesh
            return []
        local = tensor.to_local()
    else:
        local = tensor
    chunks = _create_chunk_list(tensor)
    if len(chunks) != 1:
        raise ConfigurationError(f"fused expert tensor {key!r}: {len(chunks)} local chunks; expected one (a DTensor or a tensor)")
    (chunk,) = chunks
    out = []
    for piece in expert_pieces(rule, prefix, tuple(tensor.shape), tuple(chunk.offsets), tuple(chunk.sizes)):
        if math.prod(piece.sizes) == 0:  # an empty per-expert tensor: declared, no bytes
            out.append((piece, local.new_empty(piece.sizes)))
            continue
        view = local[piece.index]
        out.append((piece, view.transpose(-2, -1) if piece.transpose else view))
    return out


class _FusedSource:
    """A fused expert tensor presented to DCP as the per-expert pieces this rank holds.

    DCP asks each state-dict value for its write items (``__create_write_items__``,
    the protocol DTensor implements), so the pieces enter the local plan, DCP's
    dedup and its validation like any other chunk.
    """

    def __init__(self, pieces: list[tuple[ExpertPiece, torch.Tensor]], properties: TensorProperties) -> None:
        self.pieces = pieces
        self.properties = properties

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(p.name, torch.Size(p.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=torch.Size(p.sizes)),
                    properties=self.properties,
                    size=torch.Size(p.shape),
                ),
            )
            for p, _ in self.pieces
        ]


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
        _refuse_partial(saved, "save")
        _refuse_misplaced(saved, "save")
        meta = sorted(k for k, v in saved.items() if _is_meta(v))
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
            _rename(self, names)
        fused = _match_fused(self.expert_rules, self.state_dict, self.strict)
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
            _rename(self, KeyMapping(rename=renames).names(self.state_dict))
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
            pieces = _local_pieces(key, rule, prefix, tensor)
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            self.state_dict[key] = _FusedSource(pieces, TensorProperties.create_from_tensor(local))
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


class SafetensorsLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner plus key rules and an explicit dtype policy.

    Args:
        mapping: the same rules as on save: each target key is looked up under
            its checkpoint name; keys the rules leave out are not loaded.
        dtype_policy: what a dtype difference between checkpoint and target
            does: ``"error"`` (default) raises naming every such key;
            ``"cast"`` converts into the target's dtype. A target's dtype never
            changes silently.
        broadcast_from_rank0: plain (non-DTensor) tensors are read by rank 0
            only and broadcast; each rank gets a tensor of the checkpoint's
            dtype and shape (a ``meta`` placeholder, or one of another dtype,
            is replaced in the caller's state dict; a matching tensor is
            loaded in place). Every rank must list the same plain tensors.
        process_group: the group ``dcp.load`` runs on (for the broadcast).
        hf_experts: fill fused MoE expert parameters from per-expert keys (the
            rules as on save). Each rank reads only the pieces of its own
            shard, one expert at a time, straight into the parameter; a
            checkpoint that holds the fused key itself is read as it is.
        strict: a ``hf_experts`` rule that matches no key is an error (by
            default a warning).
        **kwargs: ``DefaultLoadPlanner``'s arguments (``allow_partial_load``, ...).

    A target key the checkpoint lacks (unless ``allow_partial_load=True``) or
    holds with another shape is a :class:`CheckpointMismatchError` naming it and
    the checkpoint keys near it; fused experts the checkpoint holds per expert
    name the ``hf_experts`` rules to pass. ``meta`` targets get memory on the
    process group's device, or on the CPU without a process group.

    Example:
        >>> import tempfile, torch, dcp_safetensors
        >>> path = tempfile.mkdtemp()
        >>> dcp_safetensors.save({"w": torch.ones(2)}, path)
        >>> state = {"w": torch.empty(2, device="meta")}  # no process group here
        >>> dcp_safetensors.load(state, path, planner=SafetensorsLoadPlanner())
        >>> state["w"]
        tensor([1., 1.])
    """

    def __init__(
        self,
        *,
        mapping: KeyMapping | None = None,
        dtype_policy: Literal["error", "cast"] = "error",
        broadcast_from_rank0: bool = False,
        process_group: dist.ProcessGroup | None = None,
        hf_experts: bool | Sequence[FusedExperts] = False,
        strict: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dtype_policy not in ("error", "cast"):
            raise ConfigurationError(f"dtype_policy must be 'error' or 'cast', got {dtype_policy!r}")
        self.mapping = mapping or KeyMapping()
        self.dtype_policy = dtype_policy
        self.broadcast_from_rank0 = broadcast_from_rank0
        self.process_group = process_group
        self.broadcast_keys: list[str] = []
        self.broadcasting = False  # this load reads plain tensors on rank 0 and broadcasts them
        self._replace: set[str] = set()
        self._twins: dict[str, list[str]] = {}
        self.expert_rules = resolve_rules(hf_experts)
        self.strict = strict
        self._fused: dict[str, tuple[FusedExperts, str, torch.Tensor]] = {}
        self._pieces: dict[PieceKey, torch.Tensor] = {}

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        # DCP allocates meta placeholders with the placeholder's dtype; note them first so a
        # broadcast buffer is allocated with the checkpoint's dtype instead.
        self.broadcast_keys, self.broadcasting, self._replace = [], False, set()
        flat, _ = flatten_state_dict(state_dict)
        was_meta = {
            name for k, v in flat.items()
            if _is_meta(v) and not isinstance(v, DTensor) and (name := self.mapping.name_of(k)) is not None
        }
        _meta_on_cpu(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if not self.mapping.is_identity:
            _rename(self, self.mapping.names(self.state_dict))
        _refuse_partial(self.state_dict, "load into")
        _refuse_misplaced(self.state_dict, "load into")
        fused = _match_fused(self.expert_rules, self.state_dict, self.strict)
        if metadata is not None:
            present = metadata.state_dict_metadata
            # A block key the checkpoint holds under its own name (saved without the rules) is read as it is.
            renames = {k: n for k, n in block_renames(fused, self.state_dict).items() if n in present or k not in present}
            if renames:
                _rename(self, KeyMapping(rename=renames).names(self.state_dict))
                was_meta = {renames.get(k, k) for k in was_meta}
            # Before the broadcast split, which leaves ranks other than 0 without the pair's twin.
            self._read_tied_once(metadata)
        if self.broadcast_from_rank0 and metadata is not None and _distributed(self.process_group):
            self._plan_broadcast(metadata, was_meta)
        if metadata is not None:
            self._take_fused(metadata, fused)
        if self.dtype_policy == "error" and metadata is not None:
            clashes = []
            targets = [(k, k, v) for k, v in self.state_dict.items()]
            targets += [(name, key, v) for key, (rule, prefix, v) in self._fused.items() for name in rule.names(prefix, 1)]
            for name, key, value in targets:
                md = metadata.state_dict_metadata.get(name)
                if isinstance(md, TensorStorageMetadata) and isinstance(value, torch.Tensor):
                    if md.properties.dtype != value.dtype:
                        of = f" {key}" if key != name else ""
                        clashes.append(f"{name} ({md.properties.dtype} in the checkpoint, {value.dtype} in the target{of})")
            if clashes:
                raise ConfigurationError(
                    f"dtype differs for {len(clashes)} tensors: {'; '.join(clashes[:10])}"
                    f"{' ...' if len(clashes) > 10 else ''}; pass dtype_policy='cast' to convert"
                )

    def create_local_plan(self) -> LoadPlan:
        # DefaultLoadPlanner re-flattens the caller's whole state dict when checkpoint keys
        # are missing from the target (a fallback for torch <= 2.3 .distcp key names),
        # which would undo the key rules and the broadcast split: plan what is kept.
        assert self.metadata is not None
        # Here, not in set_up_planner: DCP sets up the reader in between, and a checkpoint the
        # reader could not open is that error, not every key missing.
        self._check_against(self.metadata)
        plan = create_default_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)
        # What decides this rank's collectives (the broadcast) travels with its plan and is
        # compared by the coordinator before any of them runs.
        declared = LoadPlanData(self.options(), tuple(self.broadcast_keys) if self.broadcasting else None)
        return dataclasses.replace(plan, items=plan.items + self._fused_read_items(), planner_data=declared)

    def options(self) -> dict[str, Any]:
        """The options every rank must pass alike (compared by the coordinator)."""
        return describe({
            "mapping": self.mapping, "dtype_policy": self.dtype_policy, "broadcast_from_rank0": self.broadcast_from_rank0,
            "hf_experts": self.expert_rules, "strict": self.strict, "allow_partial_load": self.allow_partial_load,
            "flatten_state_dict": self.flatten_state_dict, "flatten_sharded_tensors": self.flatten_sharded_tensors,
        })

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        check_agreement(
            "SafetensorsLoadPlanner",
            [p.planner_data.options if isinstance(p.planner_data, LoadPlanData) else None for p in global_plan],
        )
        _agree_on_broadcast([p.planner_data.broadcast_keys for p in global_plan])
        return super().create_global_plan(global_plan)

    def _read_tied_once(self, metadata: Metadata) -> None:
        """Of a pair tied in the target (one tensor under both keys), plan only the key the checkpoint stores.

        The other key (``lm_head.weight`` of a ``save_pretrained`` checkpoint with
        ``tie_word_embeddings``) is absent from the checkpoint, or our reader lists
        it as a :class:`TiedTensorStorageMetadata` of its twin, confirmed or not:
        reading the twin fills both, once. ``_twins`` keeps the pairs for a
        broadcast that replaces the twin's tensor.
        """
        md = metadata.state_dict_metadata

        def stored(key: str) -> bool:
            return key in md and not isinstance(md[key], TiedTensorStorageMetadata)

        self._twins = {}
        for alias, kept in tied_keys(self.state_dict).items():
            for drop, keep in ((alias, kept), (kept, alias)):
                if stored(keep) and not stored(drop) and drop in self.state_dict:
                    del self.state_dict[drop]
                    self._twins.setdefault(keep, []).append(drop)
                    break

    # -- fused MoE experts from per-expert keys ------------------------------------------

    def _take_fused(self, metadata: Metadata, fused: dict[str, tuple[FusedExperts, str]]) -> None:
        """Move fused targets stored as per-expert keys out of the plain plan (their keys are checked with the rest)."""
        present = metadata.state_dict_metadata
        # A fused key the checkpoint holds itself is read as it is; one this rank no longer
        # plans (a tied twin filled through the other) is not read at all.
        self._fused = {
            key: (rule, prefix, self.state_dict.pop(key))
            for key, (rule, prefix) in fused.items()
            if key not in present and key in self.state_dict
        }

    def _check_against(self, metadata: Metadata) -> None:
        """Every target key in the checkpoint with its shape, fused experts in their rules' layout.

        Our errors, naming the key, the checkpoint and the fix, where DCP raises a bare RuntimeError.
        """
        present = metadata.state_dict_metadata
        where = _where(metadata)
        conflict = layout_conflict((key, rule, prefix, tuple(t.shape)) for key, (rule, prefix, t) in self._fused.items())
        if conflict:
            raise ConfigurationError(
                f"hf_experts: these fused targets are not in the layout the rules describe: {conflict}; "
                f"the per-expert keys of {where} would fill them along the wrong axis: pass FusedExperts "
                "rules for this layout (dcp_safetensors.experts), or load a checkpoint that holds the fused keys"
            )
        for key, (rule, prefix, tensor) in self._fused.items():
            for split in rule.splits:
                shape = expert_shape(split, tuple(tensor.shape), key)
                for e in range(tensor.shape[0]):
                    name = split.name.format(prefix=prefix, e=e)
                    md = present.get(name)
                    if not isinstance(md, TensorStorageMetadata):
                        hint = per_expert_hint(key, present)
                        fix = f"; it holds {hint[1]!r}: load with SafetensorsLoadPlanner({hint[0]})" if hint else ""
                        raise CheckpointMismatchError(
                            f"{where}: no tensor {name!r}, expert {e} of {key!r} ({list(tensor.shape)}); "
                            f"the checkpoint has {sum(1 for k in present if k.startswith(prefix))} keys under {prefix!r}{fix}"
                        )
                    if tuple(md.size) != shape:
                        raise CheckpointMismatchError(
                            f"{where}: {name!r} is {list(md.size)} in the checkpoint; expert {e} of {key!r} "
                            f"({list(tensor.shape)}) needs {list(shape)}"
                        )
        missing = [] if self.allow_partial_load else [k for k in self.state_dict if k not in present]
        for key in missing:
            hint = per_expert_hint(key, present)
            if hint:
                raise CheckpointMismatchError(
                    f"{where}: no tensor {key!r}; the checkpoint holds this fused expert parameter per expert "
                    f"({hint[1]!r}, ...): load with SafetensorsLoadPlanner({hint[0]})"
                )
        if missing:
            names = list(present)
            shown = [f"{k!r} (the checkpoint has near it: {', '.join(map(repr, _near(k, names))) or 'nothing'})" for k in missing[:3]]
            shown += [repr(k) for k in missing[3:10]]
            raise CheckpointMismatchError(
                f"{where}: {len(missing)} target keys are not in the checkpoint: {'; '.join(shown)}"
                f"{' ...' if len(missing) > 10 else ''}; map the names (KeyMapping, model_prefix=) or pass "
                "SafetensorsLoadPlanner(allow_partial_load=True) to load the rest"
            )
        resized = [
            f"{k!r} ({list(md.size)} in the checkpoint, {list(v.shape)} in the target)"
            for k, v in self.state_dict.items()
            if isinstance(v, torch.Tensor) and isinstance(md := present.get(k), TensorStorageMetadata) and tuple(md.size) != tuple(v.shape)
        ]
        if resized:
            raise CheckpointMismatchError(
                f"{where}: {len(resized)} tensors have another shape in the checkpoint: {'; '.join(resized[:10])}"
                f"{' ...' if len(resized) > 10 else ''}; the checkpoint is of another model or configuration"
            )

    def _fused_read_items(self) -> list[Any]:
        assert self.metadata is not None
        items = []
        self._pieces = {}
        for key, (rule, prefix, tensor) in self._fused.items():
            for piece, view in _local_pieces(key, rule, prefix, tensor):
                chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=torch.Size(piece.sizes))
                md = self.metadata.state_dict_metadata[piece.name]
                assert isinstance(md, TensorStorageMetadata)
                items += create_read_items_for_chunk_list(piece.name, md, [chunk])
                self._pieces[(piece.name, piece.offsets)] = view
        return items

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        piece = self._pieces.get((index.fqn, tuple(index.offset or ())))
        return piece if piece is not None else super().lookup_tensor(index)

    # -- rank-0 read + broadcast of plain tensors ----------------------------------------

    def _plan_broadcast(self, metadata: Metadata, was_meta: set[str]) -> None:
        """Rank 0 keeps the plain tensors in its read plan, the others drop them.

        No collective here: the ranks' lists are compared by the coordinator
        (:func:`_agree_on_broadcast`) before the broadcast runs, so a rank that
        fails or differs cannot leave the others waiting.
        """
        group = self.process_group
        md = metadata.state_dict_metadata
        local = sorted(
            k for k, v in self.state_dict.items()
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and isinstance(md.get(k), TensorStorageMetadata)
        )
        self.broadcasting = True
        self.broadcast_keys = local
        for key in local:
            ckpt_md = md[key]
            assert isinstance(ckpt_md, TensorStorageMetadata)
            target = self.state_dict[key]
            if key in was_meta or target.dtype != ckpt_md.properties.dtype or tuple(target.shape) != tuple(ckpt_md.size):
                self._replace.add(key)
                if dist.get_rank(group) == 0:  # read straight into the checkpoint's dtype, no cast
                    self.state_dict[key] = torch.empty(ckpt_md.size, dtype=ckpt_md.properties.dtype)
        if dist.get_rank(group) != 0:
            for key in local:
                del self.state_dict[key]

    def broadcast_after_read(self, error: BaseException | None) -> None:
        """Called by :class:`SafetensorsReader` on every rank after its reads: rank 0 sends, all receive.

        Every rank reaches every collective: a failed read on any rank is agreed
        on first, and the buffer is cut into the same chunks on every rank.
        """
        from dcp_safetensors.collectives import agree_on_errors, broadcast_bytes

        group = self.process_group
        agree_on_errors(error, group, "the rank-0 broadcast")
        md = self.metadata.state_dict_metadata  # type: ignore[union-attr]
        layout = []
        total = 0
        for key in self.broadcast_keys:
            tmd = md[key]
            assert isinstance(tmd, TensorStorageMetadata)
            nbytes = math.prod(tmd.size) * tmd.properties.dtype.itemsize
            layout.append((key, tmd, total, nbytes))
            total += -(-nbytes // 16) * 16  # each tensor aligned, so its bytes view as its dtype
        is_source = dist.get_rank(group) == 0
        buffer = torch.empty(total, dtype=torch.uint8)
        if is_source:
            for key, _, pos, n in layout:
                if n:
                    buffer[pos : pos + n] = self.state_dict[key].contiguous().reshape(-1).view(torch.uint8)
        broadcast_bytes(buffer, group)
        for key, tmd, pos, n in layout:
            value = buffer[pos : pos + n].view(tmd.properties.dtype).reshape(tmd.size).clone()
            if key in self._replace:
                # A replaced tensor replaces its tied twins too, so the pair stays one tensor.
                for name in (key, *self._twins.get(key, ())):
                    set_element(self.original_state_dict, self._path(name), value)
            elif not is_source:
                self.state_dict_target(self._path(key)).copy_(value)

    def _path(self, key: str) -> Any:
        """Where ``key`` sits in the caller's (possibly nested) state dict."""
        return self.mappings[key] if self.flatten_state_dict else (key,)

    def state_dict_target(self, path: Any) -> torch.Tensor:
        """The caller's tensor at ``path`` (loaded in place when its dtype and shape already match)."""
        node: Any = self.original_state_dict
        for part in path:
            node = node[part]
        return node
