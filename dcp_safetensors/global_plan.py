"""The coordinator's global save step in near-linear time: dedup, metadata, exact validation.

DCP's coordinator sees one ``WriteItem`` per rank per tensor: 740,000 items
for a 70B model on 1,024 ranks. torch's default global step compares chunks
pairwise when it sweeps a dim that is not the sharded one (149 s at 1,024
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
(:func:`remember` / :func:`recall`), so the writer's layout does not collect
the items a second time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

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

__all__ = ["collect_chunks", "build_metadata", "validate", "remember", "recall"]


def _nbytes(item: Any) -> int:
    """An item's bytes (1 for a non-tensor), as DCP's dedup weighs plans."""
    td = item.tensor_data
    return math.prod(td.chunk.sizes) * td.properties.dtype.itemsize if td is not None else 1


def collect_chunks(
    plans: Sequence[SavePlan], to_lowest_rank: bool = False
) -> tuple[list[SavePlan], dict[str, ChunkArrays], dict[str, STORAGE_TYPES]]:
    """Dedup, every tensor's chunks as :class:`ChunkArrays`, and DCP's ``state_dict_metadata``: one pass.

    An item several plans hold (a replicated tensor, a non-tensor value, an
    empty chunk) stays in one plan: the lowest rank's with ``to_lowest_rank``,
    else the one with the fewest bytes planned so far, as DCP's own dedup
    decides. Plans that lose nothing are returned as they are. Raises
    :class:`LayoutError` if a key is both a tensor and a non-tensor, or one
    tensor's items disagree on its dtype or global shape.

    Example:
        >>> import torch
        >>> from torch.distributed.checkpoint.planner import SavePlan
        >>> from torch.distributed.checkpoint.planner_helpers import _create_write_items
        >>> plans = [SavePlan(_create_write_items("w", torch.ones(4))) for _ in range(2)]  # replicated
        >>> kept, table, md = collect_chunks(plans)
        >>> [len(p.items) for p in kept], table["w"].ranks.tolist(), list(md)
        ([1, 0], [0], ['w'])
    """
    first: dict[tuple[str, Any], int] = {}
    shared: dict[tuple[str, Any], tuple[list[int], int]] = {}
    chunks: dict[str, tuple[list[int], list[int], list[int], TensorStorageMetadata]] = {}
    md: dict[str, STORAGE_TYPES] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            fqn = item.index.fqn
            # (fqn, offset) hashes in C; MetadataIndex's dataclass hash runs in Python.
            index = (fqn, item.index.offset)
            holder = first.setdefault(index, rank)
            if holder != rank:
                entry_s = shared.get(index)
                if entry_s is None:
                    entry_s = shared[index] = ([holder], _nbytes(item))
                if entry_s[0][-1] != rank:
                    entry_s[0].append(rank)
            td = item.tensor_data
            if td is None or item.type == WriteItemType.BYTE_IO:
                if fqn in chunks:
                    raise LayoutError(f"{fqn!r} is a tensor on rank {chunks[fqn][0][0]} and a non-tensor on rank {rank}")
                md[fqn] = BytesStorageMetadata()
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
    kept = list(plans)
    if shared:
        drop = _choose_holders(plans, shared, to_lowest_rank)
        kept = [
            dataclasses.replace(plan, items=[i for i in plan.items if (i.index.fqn, i.index.offset) not in drop[rank]])
            if rank in drop
            else plan
            for rank, plan in enumerate(plans)
        ]
        for fqn in {fqn for fqn, _ in shared}:
            entry = chunks.get(fqn)
            if entry is not None:
                chunks[fqn] = _without(entry, fqn, drop)
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
    return kept, table, md


def _choose_holders(
    plans: Sequence[SavePlan], shared: dict[tuple[str, Any], tuple[list[int], int]], to_lowest_rank: bool
) -> dict[int, set[tuple[str, Any]]]:
    """``{rank: items it drops}``: each shared item kept by its least loaded holder (or the lowest rank)."""
    candidates = {r for holders, _ in shared.values() for r in holders}
    planned = {
        r: sum(_nbytes(i) for i in plans[r].items if (i.index.fqn, i.index.offset) not in shared) for r in candidates
    }
    drop: dict[int, set[tuple[str, Any]]] = {}
    for index, (holders, nbytes) in shared.items():
        keep = holders[0] if to_lowest_rank else min(holders, key=lambda r: planned[r])
        planned[keep] += nbytes
        for r in holders:
            if r != keep:
                drop.setdefault(r, set()).add(index)
    return drop


def _without(
    entry: tuple[list[int], list[int], list[int], TensorStorageMetadata], fqn: str, drop: dict[int, set[tuple[str, Any]]]
) -> tuple[list[int], list[int], list[int], TensorStorageMetadata]:
    """A tensor's collected chunks without those dedup dropped."""
    ranks: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    tmd = entry[3]
    metas = list(tmd.chunks)
    tmd.chunks.clear()
    for rank, chunk in zip(entry[0], metas, strict=True):
        if (fqn, chunk.offsets) in drop.get(rank, ()):
            continue
        ranks.append(rank)
        offsets.extend(chunk.offsets)
        sizes.extend(chunk.sizes)
        tmd.chunks.append(chunk)
    return ranks, offsets, sizes, tmd


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


_HANDOFF: list[tuple[list[SavePlan], list[SavePlan], dict[str, ChunkArrays] | None]] = []


def remember(returned: list[SavePlan], plans: list[SavePlan], table: dict[str, ChunkArrays] | None) -> None:
    """Keep, for this coordinator's writer, the global ``plans`` behind the list the planner ``returned``.

    ``returned`` is what DCP hands the writer's ``prepare_global_plan`` next:
    the plans themselves, or with plan caching the empty plans of an
    unchanged save (then ``plans`` are the cached ones). ``table`` is their
    chunk table, if the planner built it.
    """
    _HANDOFF[:] = [(returned, plans, table)]


def recall(returned: list[SavePlan]) -> tuple[list[SavePlan], dict[str, ChunkArrays] | None] | None:
    """What :func:`remember` kept for exactly this list object (DCP passes it on as is), once."""
    if _HANDOFF and _HANDOFF[0][0] is returned:
        _, plans, table = _HANDOFF.pop()
        return plans, table
    _HANDOFF.clear()
    return None
