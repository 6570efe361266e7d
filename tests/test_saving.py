"""saving: in-place writes (POSIX) against planned parts, byte for byte, and the commit's checks of them."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layout import META, Case, box_bytes, cases, full_tensors, in_place_writes

from dcp_safetensors.blocks import MAX_BLOCK, BlockReport, decode_tables
from dcp_safetensors.collectives import ByteSource
from dcp_safetensors.errors import LayoutError
from dcp_safetensors.layout import CheckpointLayout, ChunkSpec, Extents, TensorSpec, plan_layout
from dcp_safetensors.rank_writes import chunk_segment
from dcp_safetensors.saving import LayoutSave, RunWrite, WrittenParts, write_in_place, write_parts
from dcp_safetensors.storage import open_storage


def rank_writes(layout: CheckpointLayout, case: Case, full: dict[str, np.ndarray], rank: int) -> list[RunWrite]:
    """What the writer's ``_resolve`` hands on for ``rank``: its headers, then each non-empty chunk's bytes."""
    plan = layout.rank_plans[rank]
    out = [RunWrite(h.file, Extents(0, len(h.data)), memoryview(h.data)) for h in plan.headers]
    for c in case.chunks:
        if c.rank == rank and (w := plan.chunk_write(c.key, c.offsets, c.sizes)) is not None:
            out.append(RunWrite(w.file, w.extents, memoryview(box_bytes(full[c.key], c.offsets, c.sizes))))
    return out


def save(root: Path, case: Case, full, *, in_place: bool, piece: int, threads: int) -> tuple[dict[str, bytes], dict]:
    """Plan and save ``case`` to ``root`` as every rank would, in place or by parts; the files and the index."""
    storage = open_storage(str(root))
    layout = plan_layout(case.specs, case.chunks, max_shard_size=case.max_shard_size, metadata=META,
                         world_size=case.world_size, in_place=in_place, max_part=None if in_place else piece,
                         transfer_budget=max(piece, 64))
    save = LayoutSave(storage, layout, "s1")
    # Parts need other ranks' bytes (the transfers): one process holds them all, in one source.
    source = ByteSource()
    for rank in layout.rank_plans:
        for w in rank_writes(layout, case, full, rank):
            for i, offset in enumerate(w.extents.offsets().tolist()):
                source.add(w.file, offset, w.data[i * w.extents.length : (i + 1) * w.extents.length])
    reports = []
    for rank, plan in layout.rank_plans.items():
        writer = storage.part_writer(save.session)
        if in_place:  # row blocks included: the exchange simulated, as the writer's collective does it
            writes = [RunWrite(f, e, memoryview(d)) for f, e, d in in_place_writes(layout, case, full, rank)]
            reports.append(write_in_place(writer, writes, plan.file_sizes, rank=rank, threads=threads, piece=piece))
        else:
            written = write_parts(writer, plan.parts, lambda p: source.read(p.file, p.start, p.end - p.start), threads)
            reports.append(WrittenParts.of(written))
        writer.close()
    names = save.commit(reports, objects={}, extra_files={}, model_prefix=None, aliases={},
                        blocks=[block_report(layout, case, full, rank) for rank in layout.rank_plans])
    files = {f.name: (root / f.name).read_bytes() for f in layout.files}
    assert set(files) <= set(names)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    recorded = index["metadata"]["dcp_safetensors"]
    check_block_record(root, recorded, files, layout, case)
    return files, recorded["files"]


def block_report(layout: CheckpointLayout, case: Case, full: dict[str, np.ndarray], rank: int) -> BlockReport:
    """What ``resolve_writes`` reports for ``rank``: the shares of its headers and chunks, each in its segment."""
    plan = layout.rank_plans[rank]
    writes = [(h.file, (0, len(h.data)), Extents(0, len(h.data)), h.data) for h in plan.headers]
    for c in case.chunks:
        if c.rank == rank and (w := plan.chunk_write(c.key, c.offsets, c.sizes)) is not None:
            writes.append((w.file, chunk_segment(plan, c.key, c.offsets, c.sizes), w.extents, box_bytes(full[c.key], c.offsets, c.sizes)))
    return BlockReport.of(writes, rank=rank)


def check_block_record(root: Path, recorded: dict, files: dict[str, bytes], layout: CheckpointLayout, case: Case) -> None:
    """The record holds the CRC-32 of every block of every file, blocks start at every chunk's row bound
    (a load with the save's sharding reads whole blocks), and none is longer than MAX_BLOCK."""
    meta = recorded["block_checksums"]
    record = (root / meta["file"]).read_bytes()
    assert meta["size"] == len(record) and meta["checksum"] == f"crc32:{zlib.crc32(record):08x}"
    names = sorted(recorded["files"])
    tables = decode_tables(record, [(n, recorded["files"][n]["size"], recorded["files"][n]["blocks"]) for n in names], source="r")
    for name, data in files.items():
        table = tables[name]
        bounds = [*table.starts.tolist(), len(data)]
        assert table.crcs.tolist() == [zlib.crc32(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        assert max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) <= MAX_BLOCK
        table.check(0, data, source=name, what="the whole file")
    for c in case.chunks:
        plan = layout.rank_plans[c.rank]
        w = plan.chunk_write(c.key, c.offsets, c.sizes)
        if w is not None and c.key not in layout.whole_bands:
            lo, hi = chunk_segment(plan, c.key, c.offsets, c.sizes)
            assert tables[w.file].span(lo, hi) == (lo, hi)


@settings(max_examples=40, deadline=None)
@given(cases(), st.sampled_from([1, 3, 64, 4096]), st.sampled_from([1, 3]))
def test_in_place_saves_write_the_bytes_of_planned_parts(tmp_path_factory, case: Case, piece: int, threads: int) -> None:
    """The POSIX fast path (no parts, CRC shares) against the parts path, on the same chunks: same files, same
    checksums, each the CRC-32 of the file as written; for every piece size and thread count."""
    full = full_tensors(case)
    fast, fast_index = save(tmp_path_factory.mktemp("in_place"), case, full, in_place=True, piece=piece, threads=threads)
    slow, slow_index = save(tmp_path_factory.mktemp("parts"), case, full, in_place=False, piece=piece, threads=threads)
    assert fast == slow
    assert fast_index == slow_index
    assert set(fast_index) == set(fast)
    for name, recorded in fast_index.items():
        assert recorded == {"size": len(fast[name]), "checksum": f"crc32:{zlib.crc32(fast[name]):08x}",
                            "blocks": recorded["blocks"]}, name


def two_rank_case():
    spec = TensorSpec("w", "w", "F32", (4, 6))
    chunks = [ChunkSpec(r, "w", (0, 3 * r), (4, 3)) for r in (0, 1)]  # Shard(1): one run per row each
    return spec, chunks


def test_the_commit_refuses_a_rank_that_wrote_other_bytes_than_its_plan(tmp_path: Path) -> None:
    """A rank's report short of its plan (a lost chunk) or missing: LayoutError naming file and rank, nothing published."""
    spec, chunks = two_rank_case()
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    storage = open_storage(str(tmp_path))
    layout = plan_layout([spec], chunks, max_shard_size=1000, metadata=META, world_size=2, in_place=True)
    for drop in ("chunk", "rank"):
        save = LayoutSave(storage, layout, f"s-{drop}")
        reports = []
        for rank, plan in layout.rank_plans.items():
            writes = [RunWrite(h.file, Extents(0, len(h.data)), memoryview(h.data)) for h in plan.headers]
            if not (drop == "chunk" and rank == 1):
                w = plan.chunk_write("w", chunks[rank].offsets, chunks[rank].sizes)
                writes.append(RunWrite(w.file, w.extents, memoryview(np.ascontiguousarray(data[:, 3 * rank : 3 * rank + 3]).view(np.uint8).reshape(-1))))
            writer = storage.part_writer(save.session)
            reports.append(write_in_place(writer, writes, plan.file_sizes, rank=rank, threads=2, piece=8))
            writer.close()
        if drop == "rank":
            reports = reports[:1]
        with pytest.raises(LayoutError, match=r"model.safetensors: rank 1 wrote 0 bytes, its plan holds 48; refusing to commit"):
            save.commit(reports, objects={}, extra_files={}, model_prefix=None, aliases={}, blocks=[])
        assert not (tmp_path / "model.safetensors").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dcp_safetensors-staging")]


def test_the_commit_refuses_parts_that_leave_a_hole_or_overlap(tmp_path: Path) -> None:
    """Object stores and convert write numbered parts: the commit proves they tile each file."""
    spec, chunks = two_rank_case()
    storage = open_storage(str(tmp_path))
    layout = plan_layout([spec], chunks, max_shard_size=1000, metadata=META, world_size=2, min_part=40)
    for name, edit, what in (("hole", lambda r: r[1:], "a hole"), ("overlap", lambda r: np.concatenate([r, r[-1:]]), "an overlap")):
        save = LayoutSave(storage, layout, f"s-{name}")
        rows = np.array([(0, p.number, p.start, p.end - p.start, 0) for p in layout.rank_plans[0].parts + layout.rank_plans[1].parts])
        rows = rows[np.argsort(rows[:, 1])]
        cut = edit(rows)
        report = WrittenParts(("model.safetensors",), cut, (None,) * len(cut))
        with pytest.raises(LayoutError, match=f"model.safetensors: written parts leave {what} at byte .*; refusing to commit"):
            save.commit([report], objects={}, extra_files={}, model_prefix=None, aliases={}, blocks=[])
        assert not (tmp_path / "model.safetensors").exists()


class _OrderOfFiles:
    """A RunWriter that records which file each ``write_runs`` call went to."""

    def __init__(self) -> None:
        self.files: list[str] = []

    def write_runs(self, file: str, offsets, length: int, data) -> None:
        self.files.append(file)


def test_in_place_writes_go_file_by_file_in_the_plans_order() -> None:
    """The plan starts each rank at another file (``file_sizes``' order); the writes keep that order."""
    writes = [RunWrite(f, Extents(4 * i, 4), memoryview(b"abcd")) for i in range(2) for f in ("a", "b", "c")]
    recorder = _OrderOfFiles()
    write_in_place(recorder, writes, {"c": 8, "a": 8, "b": 8}, rank=2, threads=1, piece=4)
    assert recorder.files == ["c", "c", "a", "a", "b", "b"]

