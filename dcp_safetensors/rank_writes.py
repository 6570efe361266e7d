"""What one rank writes of a save: its DCP write items resolved into bytes and where they go.

:func:`resolve_writes` is the step of ``SafetensorsWriter.write_data`` that
asks the planner for each item's data: tensors become :class:`~.saving.RunWrite`
objects (their chunk's bytes and extents in the file; column chunks of the
row exchange apart, by ``(key, offsets)``), non-tensor values become
:class:`WrittenObject` results, encoded without pickle.

Example:
    >>> import torch
    >>> from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    >>> from dcp_safetensors.layout import ChunkSpec, TensorSpec, plan_layout
    >>> planner = DefaultSavePlanner()
    >>> planner.set_up_planner({"w": torch.arange(4.0)}, is_coordinator=True)
    >>> plan = planner.create_local_plan()
    >>> layout = plan_layout([TensorSpec("w", "w", "F32", (4,))], [ChunkSpec(0, "w", (0,), (4,))],
    ...                      max_shard_size=100, metadata={}, in_place=True)
    >>> writes, held, blocks = resolve_writes(plan, planner, layout.rank_plans[0], [])
    >>> [(w.file, w.extents.start, w.extents.nbytes) for w in writes], held, blocks.rows[:, 1].tolist()
    ([('model.safetensors', 0, 88), ('model.safetensors', 88, 16)], {}, [0, 88])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dcp_safetensors.blocks import BlockReport, band
from dcp_safetensors.errors import ConfigurationError, LayoutError
from dcp_safetensors.hooks import ObjectSource
from dcp_safetensors.layout import Extents, RankWritePlan
from dcp_safetensors.objects import encode_object
from dcp_safetensors.saving import RunWrite

__all__ = ["WrittenObject", "resolve_writes", "chunk_segment"]


@dataclass(frozen=True)
class WrittenObject:
    """``WriteResult.storage_data`` of a non-tensor value: its encoded record."""

    record: dict[str, Any]


def resolve_writes(
    plan: SavePlan, planner: SavePlanner, writes: RankWritePlan, results: list[WriteResult]
) -> tuple[list[RunWrite], dict[tuple[str, tuple[int, ...]], np.ndarray], BlockReport]:
    """Every byte this rank holds (headers, chunks) and where it goes, and its shares of the block
    checksums (:mod:`~dcp_safetensors.blocks`); encode objects into ``results``.

    ``plan`` is the rank's final DCP plan, ``writes`` its part of our layout.

    Chunks that go through the row exchange come back apart, as bytes by
    ``(key, offsets)``. The block shares are of the bytes as this rank holds
    them, whoever writes them: a byte changed on its way to storage (a
    transfer, the row exchange, the write) fails the load that reads it.

    Raises :class:`ConfigurationError` naming every key of this rank whose
    tensor is on the ``meta`` device, whatever the planner.
    """
    out = [RunWrite(h.file, Extents(0, len(h.data)), memoryview(h.data)) for h in writes.headers]
    shared: list[tuple[str, tuple[int, int], Extents, Any]] = [(w.file, (0, w.extents.nbytes), w.extents, w.data) for w in out]
    exchanged = writes.row_chunks()
    held: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
    meta: dict[str, None] = {}
    for item in plan.items:
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(planner, ObjectSource):
                raise ConfigurationError(
                    f"planner {type(planner).__name__} has no lookup_object() (hooks.ObjectSource): cannot "
                    f"store {item.index.fqn!r} without pickle; use a DefaultSavePlanner subclass"
                )
            value = planner.lookup_object(item.index)
            results.append(WriteResult(item.index, 0, WrittenObject(encode_object(value))))
            continue
        chunk = item.tensor_data.chunk  # type: ignore[union-attr]
        write = writes.chunk_write(item.index.fqn, chunk.offsets, chunk.sizes)
        if write is None:  # an empty chunk (e.g. an uneven FSDP shard) has no bytes to write
            continue
        tensor = planner.resolve_data(item)
        if not isinstance(tensor, torch.Tensor):
            raise LayoutError(f"tensor {item.index.fqn!r}: planner resolved a {type(tensor).__name__}")
        if tensor.is_meta:
            # A meta tensor (a model built on the meta device, an offloaded or never
            # materialised shard) has a shape but no bytes. DCP's own planner hands it
            # over as it is; every such key of this rank is named at once below.
            meta[item.index.fqn] = None
            continue
        extents = write.extents
        if tensor.numel() * tensor.element_size() != extents.nbytes:
            raise LayoutError(
                f"tensor {item.index.fqn!r}: planner resolved {tensor.numel() * tensor.element_size()} bytes "
                f"({tensor.dtype}, {list(tensor.shape)}) for a chunk planned as {extents.nbytes} bytes"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        shared.append((write.file, chunk_segment(writes, write.key, chunk.offsets, chunk.sizes), extents, flat))
        if (write.key, write.offsets) in exchanged:
            held[write.key, write.offsets] = flat
        else:
            out.append(RunWrite(write.file, extents, memoryview(flat)))  # type: ignore[arg-type]
    if meta:
        keys = list(meta)
        raise ConfigurationError(
            f"rank {writes.rank}: these tensors are on the meta device and hold no data to save: "
            f"{', '.join(repr(k) for k in keys[:20])}{' ...' if len(keys) > 20 else ''}; materialise them first "
            "(e.g. model.to_empty(device=...) and load or initialise the weights), or save with "
            "planner=SafetensorsSavePlanner(meta_resolver=...) to supply their data "
            "(dcp_safetensors.offload.accelerate_resolver(model) for accelerate's CPU offload)"
        )
    return out, held, BlockReport.of(shared, rank=writes.rank)


def chunk_segment(writes: RankWritePlan, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> tuple[int, int]:
    """The bytes whose blocks hold this rank's chunk ``[offsets, offsets + sizes)`` of ``key``: the
    chunk's rows of the tensor, or all of it (:func:`~dcp_safetensors.blocks.band`).

    Example:
        >>> from dcp_safetensors.layout import ChunkSpec, TensorSpec, plan_layout
        >>> layout = plan_layout([TensorSpec("w", "w", "F32", (4, 2))], [ChunkSpec(0, "w", (0, 0), (4, 2))],
        ...                      max_shard_size=100, metadata={})
        >>> chunk_segment(layout.rank_plans[0], "w", (2, 0), (2, 2))
        (104, 120)
    """
    rows = None if key in writes.whole_bands or not sizes else (int(offsets[0]), int(offsets[0]) + int(sizes[0]))
    return band(writes.tensors[key], rows)
