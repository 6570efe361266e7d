"""Property tests of part planning and transfer rounds (layout.cut_parts / plan_rounds)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_safetensors.layout import PartPlan, Transfer, cut_parts, plan_rounds
from dcp_safetensors.layout.parts import _foreign_bytes


@st.composite
def ownership(draw):
    """A file of random size split into random runs held by random ranks."""
    world = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, 5000), min_size=1, max_size=40))
    owned, pos = [], 0
    for length in lengths:
        owned.append((pos, pos + length, draw(st.integers(0, world - 1))))
        pos += length
    return pos, owned


def plan_parts(file: str, size: int, owned, **rules) -> list[PartPlan]:
    """cut_parts on ``(start, end, rank)`` tuples, as numbered PartPlans."""
    a = np.asarray(owned, dtype=np.int64).reshape(-1, 3)
    rows, _ = cut_parts(file, size, a[:, 0], a[:, 1], a[:, 2], **{"max_part": None, **rules})
    return [PartPlan(file, n, s, e, r) for n, (s, e, r) in enumerate(rows.tolist(), 1)]


@settings(max_examples=300, deadline=None)
@given(ownership(), st.integers(1, 3000), st.integers(1, 6000), st.integers(1, 200))
def test_parts_tile_the_file_and_respect_the_size_rules(file, min_part, max_part, max_parts):
    size, owned = file
    max_part = max(max_part, min_part)
    parts = plan_parts("f", size, owned, min_part=min_part, max_part=max_part, max_parts=max_parts)
    assert [p.number for p in parts] == list(range(1, len(parts) + 1))
    assert parts[0].start == 0 and parts[-1].end == size
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
    limit = max(max_part, min_part, -(-size // max_parts))
    for p in parts[:-1]:
        assert p.end - p.start >= min_part  # S3's rule: every part but the last
    for p in parts:
        # At most the limit, unless a holder's run cannot be cut into pieces in [min_part, limit].
        assert p.end - p.start <= max(limit, 2 * min_part)
    # Each part goes to the rank holding most of its bytes.
    for p in parts:
        held = defaultdict(int)
        for s, e, r in owned:
            held[r] += max(0, min(e, p.end) - max(s, p.start))
        assert held[p.rank] == max(held.values())


@settings(max_examples=300, deadline=None)
@given(ownership(), st.integers(1, 3000))
def test_transfers_bring_exactly_the_foreign_bytes(file, min_part):
    size, owned = file
    parts = plan_parts("f", size, owned, min_part=min_part, max_part=4 * min_part)
    for p in parts:
        moved = _foreign_bytes(p, owned)
        covered = sorted((t.offset, t.offset + t.length) for t in moved)
        expected = []
        for s, e, r in owned:
            a, b = max(s, p.start), min(e, p.end)
            if b > a and r != p.rank:
                expected.append((a, b, r))
        assert sum(b - a for a, b in covered) == sum(b - a for a, b, _ in expected)
        assert all(t.dst == p.rank and t.src != p.rank for t in moved)
        for t in moved:  # each transfer lies inside bytes its source holds
            held = sum(max(0, min(e, t.offset + t.length) - max(s, t.offset)) for s, e, r in owned if r == t.src)
            assert held == t.length


def test_posix_parts_are_each_holders_maximal_runs():
    owned = [(0, 10, 0), (10, 30, 0), (30, 35, 1), (35, 50, 0)]
    parts = plan_parts("f", 50, owned, min_part=1)
    assert [(p.start, p.end, p.rank) for p in parts] == [(0, 30, 0), (30, 35, 1), (35, 50, 0)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(1, 1000)), max_size=50),
    st.integers(1, 1500),
)
def test_rounds_stay_within_the_budget_and_keep_every_byte(raw, budget):
    transfers = [Transfer(s, d, "f", i * 10_000, n) for i, (s, d, n) in enumerate(raw) if s != d]
    rounds = plan_rounds(transfers, budget)
    for rnd in rounds:
        sent, received = defaultdict(int), defaultdict(int)
        for t in rnd:
            sent[t.src] += t.length
            received[t.dst] += t.length
        assert max(sent.values()) <= budget and max(received.values()) <= budget
    assert sum(t.length for rnd in rounds for t in rnd) == sum(t.length for t in transfers)


def test_posix_saves_write_in_place_in_max_part_pieces(tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from dcp_safetensors import SafetensorsWriter
    from dcp_safetensors.checkpoint import verify_all
    from dcp_safetensors.storage import local

    # POSIX plans no parts: the rank writes its runs where they lie, a long run cut into
    # max_part pieces (threads and early writeback work on pieces), each CRC-32'd into the file's checksum.
    assert local.LocalStorage(str(tmp_path)).max_part == 64 << 20
    calls = []
    real = local._LocalPartWriter.write_runs

    def spy(self, file, offsets, length, data):
        calls.append((file, list(offsets), length))
        return real(self, file, offsets, length, data)

    monkeypatch.setattr(local._LocalPartWriter, "write_runs", spy)
    state = {"w": torch.arange(10240, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int8)}
    writer = SafetensorsWriter(tmp_path, max_part=4096)
    dcp.save(state, storage_writer=writer, no_dist=True)
    plan = writer._save.layout.rank_plans[0]
    assert plan.in_place and not plan.parts and not plan.rounds
    header = len(plan.headers[0].data)
    pieces = sorted((offsets[0], length) for _, offsets, length in calls)
    assert [length for _, length in pieces] == [header] + [4096] * 10 + [3]  # header, w in 10 pieces, b
    assert [start for start, _ in pieces] == [0, *range(header, header + 40960, 4096), header + 40960]
    assert verify_all(str(tmp_path)).ok
    assert all(torch.equal(v, state[k]) for k, v in load_file(str(tmp_path / "model.safetensors")).items())


def test_byte_source_reads_from_many_threads_at_once_before_the_first_sort():
    """Write threads read parts of one file concurrently; the first read sorts its pieces. CPython's
    list.sort shows the list empty while it sorts, so without a lock a racing read found no bytes
    (a LayoutError seen under load in the FSDP2 + TP save)."""
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows in every round
    try:
        _read_concurrently()
    finally:
        sys.setswitchinterval(interval)


def _read_concurrently() -> None:
    import threading

    from dcp_safetensors.collectives import ByteSource

    for _ in range(3):
        source = ByteSource()
        data = bytes(range(256)) * 1024  # 256 KiB, as 65,536 pieces of 4 bytes, added out of order
        for off in reversed(range(0, len(data), 4)):
            source.add("f", off, memoryview(data)[off : off + 4])
        start = threading.Barrier(8)
        errors: list[Exception] = []
        results: dict[int, bytes] = {}

        def read(i: int, source: ByteSource, start: threading.Barrier, errors: list, results: dict) -> None:
            start.wait()
            try:
                results[i] = b"".join(source.read("f", i * 32768, 32768))
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)

        threads = [threading.Thread(target=read, args=(i, source, start, errors, results)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all(results[i] == data[i * 32768 : (i + 1) * 32768] for i in range(8))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=300), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_threaded_part_writes_give_the_bytes_and_crcs_of_one_thread(lengths, threads, seed):
    """saving.write_parts hands threads runs of parts: same file bytes, same CRCs, same order as one thread."""
    import tempfile
    import zlib

    from dcp_safetensors.saving import write_parts
    from dcp_safetensors.storage import open_storage

    # From a seed, not drawn byte by byte: that exceeded hypothesis's entropy limit (a flaky health check).
    data = np.random.default_rng(seed).integers(0, 256, sum(lengths), dtype=np.uint8).tobytes()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    parts = [PartPlan("f", i + 1, s, s + n, 0) for i, (s, n) in enumerate(zip(starts, lengths))]
    view = memoryview(data)
    results = {}
    for t in (1, threads):
        storage = open_storage(tempfile.mkdtemp())
        session = storage.begin_save("s", ["f"])
        writer = storage.part_writer(session)
        written = write_parts(writer, parts, lambda p: [view[p.start : p.start + 1], view[p.start + 1 : p.end]], t)
        writer.close()
        with open(storage.path(f"{session.staging}/f"), "rb") as f:
            assert f.read() == data
        results[t] = [(w.part, w.crc) for w in written]
        assert [c for _, c in results[t]] == [zlib.crc32(data[p.start : p.end]) for p in parts]
        storage.abort_save(session)
    assert results[1] == results[threads]
