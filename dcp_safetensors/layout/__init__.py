"""The global byte layout of a checkpoint, planned once from every rank's chunks.

Pure functions (no torch): given each tensor's global shape and dtype and
every rank's chunk of it (what DCP's coordinator sees in
``prepare_global_plan``), decide

1. which file each tensor goes to (``max_shard_size``, natural key order),
2. where it sits inside the file (``save_file``'s order: dtype, then name),
3. each file's exact header bytes and size,
4. the byte runs each rank's chunk occupies in its file (:class:`Extents`), and
5. which rank writes each file's header (the owner of its first data byte).

The result, :class:`CheckpointLayout`, is the frozen snapshot: headers, the
index and every rank's writes all derive from it. :func:`check_tiling`
proves, before any byte is written, that each tensor's chunks cover it
exactly once, in O(n log n) for the grid-shaped chunks DTensor produces.

Built for thousands of ranks: chunks travel as per-tensor numpy arrays
(:class:`ChunkArrays`), runs and parts are computed a tensor or a file at a
time, and each rank's :class:`RankWritePlan` holds only where its own
tensors sit and the parts it writes; the rank turns its chunks into byte
runs itself (:meth:`RankWritePlan.chunk_write`).

Modules, each importing only those above it:

* :mod:`.geometry`: tensors, chunks, chunk tables, a box's byte runs
* :mod:`.tiling`: the proof that chunks cover a tensor exactly once
* :mod:`.files`: ``max_shard_size``, HF file names, tensor order, headers
* :mod:`.parts`: parts of a file, their writers, transfers and rounds
* :mod:`.row_blocks`: short-run column chunks exchanged into row blocks (POSIX)
* :mod:`.plan`: :func:`plan_layout`, every rank's :class:`RankWritePlan`

Every name is importable from here, as from the single module this was.

Example:
    >>> specs = [TensorSpec("w", "w", "F32", (4, 2))]
    >>> chunks = [ChunkSpec(0, "w", (0, 0), (2, 2)), ChunkSpec(1, "w", (2, 0), (2, 2))]
    >>> layout = plan_layout(specs, chunks, max_shard_size=10**9, metadata={"format": "pt"})
    >>> [f.name for f in layout.files]
    ['model.safetensors']
    >>> layout.rank_plans[1].chunk_write("w", (2, 0), (2, 2)).extents
    Extents(start=112, length=16, counts=(), strides=())
"""

from dcp_safetensors.layout.files import FileLayout, file_names, natural_key, parse_size
from dcp_safetensors.layout.geometry import (
    MODEL_GROUP,
    ChunkArrays,
    ChunkSpec,
    Extents,
    TensorLocation,
    TensorSpec,
    chunk_extents,
    chunk_table,
)
from dcp_safetensors.layout.parts import (
    MAX_PARTS,
    PartPlan,
    PartTable,
    Transfer,
    TransferRound,
    cut_parts,
    plan_rounds,
)
from dcp_safetensors.layout.plan import (
    CheckpointLayout,
    ChunkWrite,
    HeaderWrite,
    RankWritePlan,
    plan_layout,
    whole_row_bands,
    with_header_metadata,
)
from dcp_safetensors.layout.row_blocks import SMALL_RUN, RowSlab, plan_row_rounds, plan_row_slabs
from dcp_safetensors.layout.tiling import check_tiling

__all__ = [
    "MODEL_GROUP",
    "MAX_PARTS",
    "TensorSpec",
    "TensorLocation",
    "ChunkSpec",
    "Extents",
    "ChunkWrite",
    "HeaderWrite",
    "RankWritePlan",
    "PartTable",
    "ChunkArrays",
    "chunk_table",
    "check_tiling",
    "with_header_metadata",
    "FileLayout",
    "CheckpointLayout",
    "parse_size",
    "natural_key",
    "chunk_extents",
    "plan_layout",
    "whole_row_bands",
    "cut_parts",
    "plan_rounds",
    "PartPlan",
    "Transfer",
    "TransferRound",
    "file_names",
    "SMALL_RUN",
    "RowSlab",
    "plan_row_slabs",
    "plan_row_rounds",
]
