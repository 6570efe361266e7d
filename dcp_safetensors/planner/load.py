"""The load planner: key rules, the dtype policy, meta targets, tied keys, fused experts and the rank-0 broadcast.

:class:`SafetensorsLoadPlanner` subclasses DCP's ``DefaultLoadPlanner``. Its
plans carry :class:`LoadPlanData` (its options and the plain tensors it
broadcasts), which the coordinator compares before any collective runs; the
broadcast itself runs in :meth:`SafetensorsLoadPlanner.broadcast_after_read`,
called by the reader.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import (
    _iterate_state_dict,
    create_read_items_for_chunk_list,
)
from torch.distributed.tensor import DTensor

from dcp_safetensors.agreement import check_agreement, describe
from dcp_safetensors.errors import CheckpointMismatchError, ConfigurationError
from dcp_safetensors.experts import (
    FusedExperts,
    block_renames,
    expert_shape,
    layout_conflict,
    per_expert_hint,
    resolve_rules,
)
from dcp_safetensors.mapping import KeyMapping
from dcp_safetensors.planner.fused import PieceKey, local_pieces, match_fused
from dcp_safetensors.planner.state_dict import (
    is_meta,
    refuse_misplaced,
    refuse_partial,
    rename_keys,
    tied_keys,
)
from dcp_safetensors.reader import TiedTensorStorageMetadata

__all__ = ["SafetensorsLoadPlanner", "LoadPlanData"]


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


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
            if is_meta(v) and not isinstance(v, DTensor) and (name := self.mapping.name_of(k)) is not None
        }
        _meta_on_cpu(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if not self.mapping.is_identity:
            rename_keys(self, self.mapping.names(self.state_dict))
        refuse_partial(self.state_dict, "load into")
        refuse_misplaced(self.state_dict, "load into")
        fused = match_fused(self.expert_rules, self.state_dict, self.strict)
        if metadata is not None:
            present = metadata.state_dict_metadata
            # A block key the checkpoint holds under its own name (saved without the rules) is read as it is.
            renames = {k: n for k, n in block_renames(fused, self.state_dict).items() if n in present or k not in present}
            if renames:
                rename_keys(self, KeyMapping(rename=renames).names(self.state_dict))
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
            for piece, view in local_pieces(key, rule, prefix, tensor):
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
