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
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _create_chunk_list,
    create_read_items_for_chunk_list,
)
from torch.distributed.tensor import DTensor

from dcp_safetensors import global_plan
from dcp_safetensors.errors import CheckpointMismatchError, ConfigurationError
from dcp_safetensors.experts import (
    ExpertPiece,
    FusedExperts,
    expert_pieces,
    expert_shape,
    resolve_rules,
)
from dcp_safetensors.global_plan import build_metadata, collect_chunks, validate
from dcp_safetensors.mapping import KeyMapping

logger = logging.getLogger(__name__)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

__all__ = ["SafetensorsSavePlanner", "SafetensorsLoadPlanner", "MetaResolver"]

_UNFINISHED: set[str] = set()
"""Plan-cache keys of saves on this rank that planned but got no final plan (see ``create_local_plan``)."""

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


def _refuse_partial(state_dict: dict[str, Any], what: str) -> None:
    """A Partial DTensor holds one addend per rank: writing or filling any one rank's would be wrong."""
    partial = sorted(k for k, v in state_dict.items() if isinstance(v, DTensor) and any(p.is_partial() for p in v.placements))
    if partial:
        raise ConfigurationError(
            f"cannot {what} {len(partial)} DTensors with a Partial placement (a pending reduction): "
            f"{', '.join(repr(k) for k in partial[:10])}{' ...' if len(partial) > 10 else ''}; "
            "reduce them first, e.g. t.redistribute(t.device_mesh, [Replicate()])"
        )


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
        **kwargs: ``DefaultSavePlanner``'s arguments. ``enable_plan_caching=True``
            skips re-planning a save whose local plans did not change on any
            rank (each save still gets a fresh snapshot: the writer sends the
            new snapshot's session and headers in the otherwise empty plans).

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating dtype to cast floating tensors to, got {dtype}")
        self.mapping = mapping or KeyMapping()
        self.dtype = dtype
        self.meta_resolver = meta_resolver
        self.expert_rules = resolve_rules(hf_experts)
        self.strict = strict
        self._pieces: dict[PieceKey, torch.Tensor] = {}
        # DCP caches plans per key; ours names the options that shape a plan, so a planner
        # with another dtype or mapping never reuses this one's plans.
        self._cached_plans_key = f"{type(self).__name__}:{(self.mapping, self.dtype, self.expert_rules)!r}"

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        _refuse_partial(self.state_dict, "save")
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
        self._pieces = {}
        for key, (rule, prefix) in _match_fused(self.expert_rules, self.state_dict, self.strict).items():
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
        if self._enable_plan_caching:
            if self._cached_plans_key in _UNFINISHED:
                # The last save with these plans failed after DCP cached its global plan but
                # before this rank cached its final plan (the writer's global step failed, e.g.
                # on a refused storage request): DCP would reuse plans of that save, or a final
                # plan of an older one. Every rank saw that failure: all forget, all plan afresh.
                for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans, SavePlanner._cached_global_plan,
                              SavePlanner._cached_metadata, SavePlanner._cached_final_save_plan):  # fmt: skip
                    cache.pop(self._cached_plans_key, None)
            _UNFINISHED.add(self._cached_plans_key)
        plan = super().create_local_plan()
        if self.dtype is not None:
            plan = dataclasses.replace(plan, items=[self._cast(i) for i in plan.items])
        if self.aliases:
            # DCP merges every rank's planner_data into the global Metadata handed to finish().
            plan = dataclasses.replace(plan, planner_data={**(plan.planner_data or {}), ALIASES_KEY: self.aliases})
        self.plan = plan
        return plan

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans, table, md = collect_chunks(all_plans, self.dedup_save_to_lowest_rank)
        validate(table, md)
        global_plan.remember(plans, plans, table, self._enable_plan_caching)
        return plans, build_metadata(plans, md)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        delta, metadata = super().create_global_plan(all_plans)
        if self._enable_plan_caching:
            if any(p.usable for p in delta):
                # Some rank's plan changed: the layout moves for every rank, so every rank
                # gets its whole new plan (DCP would send unchanged ranks nothing).
                delta = self.global_plan  # the list _create_global_plan remembered, with its table
            else:
                global_plan.remember(delta, self.global_plan, None, True)
        return delta, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        # A cached plan comes back empty (usable=False); the storage layer may have put
        # what changes with every save (a snapshot's session) into it.
        refresh = getattr(new_plan.storage_data, "refresh", None) if not new_plan.usable else None
        plan = super().finish_plan(new_plan)
        _UNFINISHED.discard(self._cached_plans_key)
        if refresh is not None:
            plan = dataclasses.replace(plan, storage_data=refresh(plan.storage_data))
            self.plan = plan
        return plan

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
        self._replace: set[str] = set()
        self.expert_rules = resolve_rules(hf_experts)
        self.strict = strict
        self._fused: dict[str, tuple[FusedExperts, str, torch.Tensor]] = {}
        self._pieces: dict[PieceKey, torch.Tensor] = {}

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        # DCP allocates meta placeholders with the placeholder's dtype; note them first so a
        # broadcast buffer is allocated with the checkpoint's dtype instead.
        flat, _ = flatten_state_dict(state_dict)
        was_meta = {self.mapping.name_of(k) for k, v in flat.items() if _is_meta(v) and not isinstance(v, DTensor)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        _refuse_partial(self.state_dict, "load into")
        _rename(self, self.mapping)
        if self.broadcast_from_rank0 and metadata is not None and _distributed(self.process_group):
            self._plan_broadcast(metadata, was_meta)
        if metadata is not None:
            # A tied target key the checkpoint lacks (save_pretrained drops lm_head.weight when
            # tie_word_embeddings=True) is filled through the memory it shares with its twin.
            present = metadata.state_dict_metadata
            for alias, kept in tied_keys(self.state_dict).items():
                if alias not in present and kept in present:
                    del self.state_dict[alias]
                elif kept not in present and alias in present:
                    del self.state_dict[kept]
            self._take_fused(metadata)
        if self.dtype_policy == "error" and metadata is not None:
            clashes = []
            targets = [(k, k, v) for k, v in self.state_dict.items()]
            targets += [(name, key, v) for key, (rule, prefix, v) in self._fused.items() for name in rule.names(prefix, 1)]
            for name, key, value in targets:
                md = metadata.state_dict_metadata.get(name)
                if isinstance(md, TensorStorageMetadata) and isinstance(value, torch.Tensor):
                    if md.properties.dtype != value.dtype:
                        fused = f" {key}" if key != name else ""
                        clashes.append(f"{name} ({md.properties.dtype} in the checkpoint, {value.dtype} in the target{fused})")
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
        plan = create_default_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)
        return dataclasses.replace(plan, items=plan.items + self._fused_read_items())

    # -- fused MoE experts from per-expert keys ------------------------------------------

    def _take_fused(self, metadata: Metadata) -> None:
        """Move fused targets stored as per-expert keys out of the plain plan, checking every key is there."""
        present = metadata.state_dict_metadata
        where = metadata.storage_meta.checkpoint_id if metadata.storage_meta else "the checkpoint"
        for key, (rule, prefix) in _match_fused(self.expert_rules, self.state_dict, self.strict).items():
            if key in present:
                continue  # the checkpoint holds the fused tensor itself
            tensor = self.state_dict[key]
            for split in rule.splits:
                shape = expert_shape(split, tuple(tensor.shape), key)
                for e in range(tensor.shape[0]):
                    name = split.name.format(prefix=prefix, e=e)
                    md = present.get(name)
                    if not isinstance(md, TensorStorageMetadata):
                        raise CheckpointMismatchError(
                            f"{where}: no tensor {name!r}, expert {e} of {key!r} ({list(tensor.shape)}); "
                            f"the checkpoint has {sum(1 for k in present if k.startswith(prefix))} keys under {prefix!r}"
                        )
                    if tuple(md.size) != shape:
                        raise CheckpointMismatchError(
                            f"{where}: {name!r} is {list(md.size)} in the checkpoint; expert {e} of {key!r} "
                            f"({list(tensor.shape)}) needs {list(shape)}"
                        )
            self._fused[key] = (rule, prefix, tensor)
            del self.state_dict[key]

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

    def _plan_broadcast(self, metadata: Metadata, was_meta: set[str | None]) -> None:
        """Agree on the plain tensors to broadcast; only rank 0 keeps them in its read plan."""
        group = self.process_group
        md = metadata.state_dict_metadata
        local = sorted(
            k for k, v in self.state_dict.items()
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and isinstance(md.get(k), TensorStorageMetadata)
        )
        everyone: list[list[str] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, local, group=group)
        if any(keys != everyone[0] for keys in everyone):
            differing = [r for r, keys in enumerate(everyone) if keys != everyone[0]]
            sets = [set(keys or ()) for keys in everyone]
            common: set[str] = set(sets[0]).intersection(*sets[1:])
            extra = sorted(set().union(*sets) - common)
            raise ConfigurationError(
                f"broadcast_from_rank0: ranks {differing} hold other plain tensors than rank 0 "
                f"(keys not on every rank: {', '.join(extra[:10])}); every rank must list the same ones"
            )
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
            path = self.mappings[key] if self.flatten_state_dict else (key,)
            if key in self._replace:
                set_element(self.original_state_dict, path, value)
            elif not is_source:
                self.state_dict_target(path).copy_(value)

    def state_dict_target(self, path: Any) -> torch.Tensor:
        """The caller's tensor at ``path`` (loaded in place when its dtype and shape already match)."""
        node: Any = self.original_state_dict
        for part in path:
            node = node[part]
        return node
