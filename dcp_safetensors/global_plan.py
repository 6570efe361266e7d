"""The coordinator's global save step in near-linear time: dedup, metadata, exact validation.

DCP's coordinator sees one ``WriteItem`` per rank per tensor: 740,000 items
for a 70B model on 1,024 ranks. torch's default global step compares chunks
pairwise when it sweeps a dim that is not the sharded one (54 s at 1,024
ranks on a 2-core machine); here every step is one pass over the items plus
numpy per tensor:

* :func:`collect_chunks` dedups replicated items (each kept by the holder
  with the fewest bytes planned so far, touching only plans that change)
  and groups every kept chunk by tensor, columnar
  (:class:`~dcp_safetensors.layout.ChunkArrays`), with DCP's metadata;
* :func:`build_metadata` makes DCP's ``Metadata`` from them;
* :func:`validate` proves, per tensor, that the chunks are in bounds,
  disjoint and cover it (:func:`~dcp_safetensors.layout.check_tiling`, no
  pairwise sweep).

The planner hands its chunk table to the writer of the same save
(:class:`PlannedSave`, in the plan), so the writer's layout does not collect
the items a second time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.distributed.checkpoint.metadata import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

from dcp_safetensors.errors import LayoutError
from dcp_safetensors.layout import ChunkArrays, TensorSpec, check_tiling
from dcp_safetensors.mapping import place_key

if TYPE_CHECKING:
    from dcp_safetensors.plan_cache import SaveCache

__all__ = ["collect_chunks", "build_metadata", "validate", "declared_specs", "PlannedSave"]


def collect_chunks(
    plans: Sequence[SavePlan], to_lowest_rank: bool = False
) -> tuple[list[SavePlan], dict[str, ChunkArrays], dict[str, STORAGE_TYPES]]:
    """Dedup, every tensor's chunks as :class:`ChunkArrays`, and DCP's ``state_dict_metadata``.

    One pass over the items collects; numpy finds the replicated ones. An item
    several plans hold (a replicated tensor, a non-tensor value, an empty
    chunk) stays in one plan: the lowest rank's with ``to_lowest_rank``, else
    the one with the fewest bytes planned, as DCP's own dedup decides. Plans
    that lose nothing are returned as they are. Raises :class:`LayoutError`
    if a key is both a tensor and a non-tensor, or one tensor's items
    disagree on its dtype or global shape.

    Example:
        >>> import torch
        >>> from torch.distributed.checkpoint.planner import SavePlan
        >>> from torch.distributed.checkpoint.planner_helpers import _create_write_items
        >>> plans = [SavePlan(_create_write_items("w", torch.ones(4))) for _ in range(2)]  # replicated
        >>> kept, table, md = collect_chunks(plans)
        >>> [len(p.items) for p in kept], table["w"].ranks.tolist(), list(md)
        ([1, 0], [0], ['w'])
    """
    chunks: dict[str, tuple[list[int], list[int], list[int], TensorStorageMetadata]] = {}
    objects: dict[str, list[int]] = {}
    md: dict[str, STORAGE_TYPES] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            fqn = item.index.fqn
            td = item.tensor_data
            if td is None or item.type == WriteItemType.BYTE_IO:
                if fqn in chunks:
                    raise LayoutError(f"{fqn!r} is a tensor on rank {chunks[fqn][0][0]} and a non-tensor on rank {rank}")
                md[fqn] = BytesStorageMetadata()
                objects.setdefault(fqn, []).append(rank)
                continue
            entry = chunks.get(fqn)
            if entry is None:
                if fqn in md:
                    raise LayoutError(f"{fqn!r} is a non-tensor on one rank and a tensor on rank {rank}")
                tmd = TensorStorageMetadata(properties=td.properties, size=td.size, chunks=[])
                md[fqn] = tmd
                entry = chunks[fqn] = ([], [], [], tmd)
            elif td.size != entry[3].size or td.properties.dtype != entry[3].properties.dtype:
                raise LayoutError(
                    f"tensor {fqn!r}: rank {rank} holds {td.properties.dtype} {list(td.size)}, "
                    f"rank {entry[0][0]} {entry[3].properties.dtype} {list(entry[3].size)}"
                )
            chunk = td.chunk
            entry[0].append(rank)
            entry[1].extend(chunk.offsets)
            entry[2].extend(chunk.sizes)
            entry[3].chunks.append(chunk)
    table = {}
    for fqn, (ranks, offsets, sizes, tmd) in chunks.items():
        k, ndim = len(ranks), len(tmd.size)
        if len(offsets) != k * ndim or len(sizes) != k * ndim:
            bad = next(r for r, c in zip(ranks, tmd.chunks, strict=True) if len(c.offsets) != ndim or len(c.sizes) != ndim)
            raise LayoutError(f"tensor {fqn!r}: rank {bad}'s chunk does not have the tensor's {ndim} dims")
        table[fqn] = ChunkArrays(
            np.asarray(ranks, dtype=np.int64),
            np.asarray(offsets, dtype=np.int64).reshape(k, ndim),
            np.asarray(sizes, dtype=np.int64).reshape(k, ndim),
        )
    drop = _dedup(table, md, objects, len(plans), to_lowest_rank)
    if not drop:
        return list(plans), table, md
    kept = [
        dataclasses.replace(plan, items=[i for i in plan.items if (i.index.fqn, i.index.offset or ()) not in drop[rank]])
        if rank in drop
        else plan
        for rank, plan in enumerate(plans)
    ]
    return kept, table, md


def _dedup(
    table: dict[str, ChunkArrays],
    md: dict[str, STORAGE_TYPES],
    objects: dict[str, list[int]],
    world: int,
    to_lowest_rank: bool,
) -> dict[int, set[tuple[str, tuple[int, ...]]]]:
    """Keep one copy of every replicated chunk and object; ``{rank: (fqn, offsets) it drops}``.

    Updates ``table`` and the metadata's chunk lists in place.
    """
    # (fqn, holder ranks, bytes, offsets) of each replicated chunk or object
    groups: list[tuple[str, np.ndarray, int, tuple[int, ...]]] = []
    planned = np.zeros(world, dtype=np.int64)
    for fqn, arrays in table.items():
        tmd = md[fqn]
        assert isinstance(tmd, TensorStorageMetadata)
        itemsize = tmd.properties.dtype.itemsize
        nbytes = arrays.sizes.prod(axis=1) * itemsize
        if len(arrays.ranks) > 1:
            rows = np.concatenate([arrays.offsets, arrays.sizes], axis=1)
            _, first, inverse, counts = np.unique(rows, axis=0, return_index=True, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)
            if (counts > 1).any():
                for g in np.flatnonzero(counts > 1).tolist():
                    at = first[g]
                    groups.append((fqn, arrays.ranks[inverse == g], int(nbytes[at]), tuple(arrays.offsets[at].tolist())))
                unique = counts[inverse] == 1
                planned += np.bincount(arrays.ranks[unique], weights=nbytes[unique], minlength=world).astype(np.int64)
                continue
        planned += np.bincount(arrays.ranks, weights=nbytes, minlength=world).astype(np.int64)
    for fqn, holders in objects.items():
        if len(holders) > 1:
            groups.append((fqn, np.asarray(holders, dtype=np.int64), 1, ()))
        else:
            planned[holders[0]] += 1
    drop: dict[int, set[tuple[str, tuple[int, ...]]]] = {}
    for fqn, who, nbytes, offsets in groups:
        keep = int(who.min()) if to_lowest_rank else int(who[np.argmin(planned[who])])
        planned[keep] += nbytes
        for r in who.tolist():
            if r != keep:
                drop.setdefault(r, set()).add((fqn, offsets))
    for fqn in {g[0] for g in groups}:
        if fqn not in table:
            continue  # a non-tensor
        arrays, tmd = table[fqn], md[fqn]
        assert isinstance(tmd, TensorStorageMetadata)
        mask = np.array(
            [(fqn, tuple(o)) not in drop.get(r, ()) for r, o in zip(arrays.ranks.tolist(), arrays.offsets.tolist(), strict=True)]
        )
        table[fqn] = ChunkArrays(arrays.ranks[mask], arrays.offsets[mask], arrays.sizes[mask])
        tmd.chunks = [c for c, m in zip(tmd.chunks, mask.tolist(), strict=True) if m]
    return drop


def declared_specs(plans: Sequence[SavePlan], model_prefix: str | None) -> list[TensorSpec]:
    """Every tensor's spec, from the ``{key: (dtype, shape)}`` each rank declared in its plan's ``storage_data``.

    The declarations must agree across ranks (a LayoutError names the key and two ranks that differ).

    Example:
        >>> plans = [SavePlan([], storage_data={"w": ("F32", (4,))}), SavePlan([], storage_data={"w": ("F32", (4,))})]
        >>> [(s.key, s.dtype, s.shape) for s in declared_specs(plans, None)]
        [('w', 'F32', (4,))]
    """
    # DCP's dedup keeps one copy of a replicated item, so the ranks' own declarations
    # are compared: set operations on the dicts, no Python loop over all items.
    declared: dict[str, tuple[str, tuple[int, ...]]] = {}
    for plan in reversed(plans):
        declared.update(plan.storage_data or {})
    for plan in plans:
        mine = plan.storage_data or {}
        if not mine.items() <= declared.items():
            key = next(k for k, v in mine.items() if declared[k] != v)
            holders = [(r, p.storage_data[key]) for r, p in enumerate(plans) if key in (p.storage_data or {})]
            (r0, a), (r1, b) = holders[0], next(h for h in holders if h[1] != holders[0][1])
            raise LayoutError(f"tensor {key!r}: rank {r0} holds {a[0]} {list(a[1])}, rank {r1} holds {b[0]} {list(b[1])}")
    specs = []
    for key, (dtype, shape) in declared.items():
        group, name = place_key(key, model_prefix)
        specs.append(TensorSpec(key, name, dtype, shape, group))
    return specs


def build_metadata(plans: Sequence[SavePlan], md: dict[str, STORAGE_TYPES]) -> Metadata:
    """DCP's ``Metadata``: ``md`` and every plan's ``planner_data`` merged (the lowest rank wins a clash)."""
    merged: dict[str, Any] = {}
    for plan in reversed(plans):
        if plan.planner_data:
            merged.update(plan.planner_data)
    return Metadata(state_dict_metadata=md, planner_data=merged)


def validate(table: dict[str, ChunkArrays], md: dict[str, STORAGE_TYPES]) -> None:
    """:func:`~dcp_safetensors.layout.check_tiling` for every tensor: in bounds, disjoint, covering."""
    for fqn, tmd in md.items():
        if isinstance(tmd, TensorStorageMetadata):
            check_tiling(TensorSpec(fqn, fqn, "U8", tuple(tmd.size)), table.get(fqn))


@dataclass(frozen=True, eq=False)
class PlannedSave:
    """What :class:`~dcp_safetensors.planner.SafetensorsSavePlanner` hands the writer on the coordinator.

    It travels in the first global plan's ``planner_data`` (DCP passes the
    planner's plans to ``prepare_global_plan`` as they are), and the writer
    removes it before the plans are scattered. ``table`` holds every tensor's
    chunks, proved to tile it; ``cache`` is the planner's plan cache, where the
    writer keeps its layout; ``unchanged`` says the global plans are the last
    confirmed save's, so that save's layout may be reused.
    """

    table: dict[str, ChunkArrays]
    cache: SaveCache | None = None
    unchanged: bool = False
