"""layout.row_blocks: which column chunks are swapped into row blocks, and the blocks' bytes."""

from __future__ import annotations

import numpy as np

from dcp_safetensors.layout import (
    ChunkSpec,
    TensorLocation,
    chunk_table,
    plan_row_rounds,
    plan_row_slabs,
)

PLACE = TensorLocation("f", 100, "F32", (4, 8))


def dp_tp(shape=(4, 8)) -> list[ChunkSpec]:
    """dp 2 x tp 2: rows halved over dp, columns halved over tp (ranks 0, 1 share rows 0-1)."""
    rows, cols = shape[0] // 2, shape[1] // 2
    return [ChunkSpec(2 * d + t, "w", (rows * d, cols * t), (rows, cols)) for d in (0, 1) for t in (0, 1)]


def test_each_tp_group_becomes_slabs_of_whole_rows_under_the_budget() -> None:
    slabs, taken = plan_row_slabs(PLACE, chunk_table(dp_tp())["w"], "w", budget=1 << 20)
    assert taken.all()
    assert [(s.ranks, s.start, s.rows, s.row_bytes, s.columns, s.widths) for s in slabs] == [
        ((0, 1), 100, 2, 32, (0, 16), (16, 16)),
        ((2, 3), 164, 2, 32, (0, 16), (16, 16)),
    ]
    # A 32-byte budget: one row per slab, four slabs, and rounds that keep each rank within it.
    slabs, _ = plan_row_slabs(PLACE, chunk_table(dp_tp())["w"], "w", budget=32)
    assert [(s.ranks, s.first_row, s.rows, s.start) for s in slabs] == [
        ((0, 1), 0, 1, 100), ((0, 1), 1, 1, 132), ((2, 3), 0, 1, 164), ((2, 3), 1, 1, 196)]
    # A one-row slab: rank 0 sends its 16 bytes, rank 1 writes the row. 32 bytes a round fit all four;
    # 16 bytes fit one slab per pair of ranks.
    assert [len(r) for r in plan_row_rounds(slabs, budget=32)] == [4]
    assert [[s.first_row for s in r] for r in plan_row_rounds(slabs, budget=16)] == [[0], [1, 0], [1]]


def test_blocks_hold_the_rows_of_the_full_tensor() -> None:
    full = np.arange(32, dtype=np.float32).reshape(4, 8)
    chunks = {c.rank: np.ascontiguousarray(full[c.offsets[0] : c.offsets[0] + 2, c.offsets[1] : c.offsets[1] + 4])
              for c in dp_tp()}
    as_bytes = {r: c.view(np.uint8).reshape(-1) for r, c in chunks.items()}
    file = np.zeros(100 + full.nbytes, dtype=np.uint8)
    for slab in plan_row_slabs(PLACE, chunk_table(dp_tp())["w"], "w", budget=32)[0]:
        for me, rank in enumerate(slab.ranks):
            received = {r: slab.sends(i, as_bytes[r])[rank] for i, r in enumerate(slab.ranks) if r != rank}
            offset, block = slab.block(me, as_bytes[rank], received)
            file[offset : offset + block.size] = block
    assert (file[100:].view(np.float32).reshape(4, 8) == full).all()


def test_what_stays_in_place() -> None:
    table = chunk_table(dp_tp())["w"]
    # Runs of at least small_run bytes are written in place (one pwrite per run is cheap enough).
    assert plan_row_slabs(PLACE, table, "w", budget=1 << 20, small_run=16)[0] == []
    # A group whose rows are not back to back in the file: (4, 4, 4) split on dims 1 and 2.
    cube = TensorLocation("f", 0, "F32", (4, 4, 4))
    split = [ChunkSpec(2 * a + b, "w", (0, 2 * a, 2 * b), (4, 2, 2)) for a in (0, 1) for b in (0, 1)]
    slabs, taken = plan_row_slabs(cube, chunk_table(split)["w"], "w", budget=1 << 20)
    assert slabs == [] and not taken.any()
    # One rank holding both column halves of a row: pieces are found by rank, so it stays in place.
    twice = [ChunkSpec(0, "w", (0, 0), (4, 4)), ChunkSpec(0, "w", (0, 4), (4, 4))]
    assert plan_row_slabs(PLACE, chunk_table(twice)["w"], "w", budget=1 << 20)[0] == []
    # Row shards (Shard(0)) are one run each: nothing to swap.
    rows = [ChunkSpec(r, "w", (2 * r, 0), (2, 8)) for r in (0, 1)]
    assert plan_row_slabs(PLACE, chunk_table(rows)["w"], "w", budget=1 << 20)[0] == []
