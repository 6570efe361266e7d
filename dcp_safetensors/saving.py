"""One save of a planned layout, from ``begin_save`` to the commit.

:class:`~dcp_safetensors.writer.SafetensorsWriter` (every rank's parts, over
DCP's calls) and :func:`~dcp_safetensors.convert.convert` (one process
streaming a source) save the same way, through this module:

1. :class:`LayoutSave` opens the storage's session for the layout's files;
2. every part is written by :func:`write_part` (:func:`write_parts` on a
   few threads), which CRC-32s its bytes and returns a :class:`WrittenPart`;
   on POSIX a layout planned ``in_place`` has no parts: :func:`write_in_place`
   writes a rank's chunk runs where they lie and CRC-32s each into the
   rank's share of the file's checksum (:func:`~.checksum.crc32_share`).
   Either way a rank's report travels to the coordinator as one columnar
   :class:`WrittenParts`;
3. :meth:`LayoutSave.commit` proves the written bytes cover every file exactly
   once (parts: they tile it; in place: each rank wrote the bytes its plan
   holds, whose chunks were proved to tile every tensor), combines the CRCs
   into each file's checksum, writes ``objects.json`` and the config files,
   builds the index and commits.
   Any failure aborts the session: the checkpoint committed before stays.

Example:
    >>> import tempfile
    >>> from dcp_safetensors.layout import ChunkSpec, TensorSpec, plan_layout
    >>> from dcp_safetensors.storage import open_storage
    >>> layout = plan_layout([TensorSpec("w", "w", "U8", (4,))], [ChunkSpec(0, "w", (0,), (4,))],
    ...                      max_shard_size=100, metadata={"dcp_safetensors_snapshot": "s1"})
    >>> save = LayoutSave(open_storage(tempfile.mkdtemp()), layout, "s1")
    >>> writer = save.storage.part_writer(save.session)
    >>> data = layout.files[0].header + b"abcd"
    >>> written = [write_part(writer, p, [memoryview(data)[p.start:p.end]]) for p in layout.rank_plans[0].parts]
    >>> writer.close()
    >>> n = len(layout.files[0].header)  # its blocks: the header's, then the one chunk's rows
    >>> blocks = BlockReport.of([("model.safetensors", (0, n), Extents(0, n), data[:n]),
    ...                          ("model.safetensors", (n, n + 4), Extents(n, 4), data[n:])])
    >>> save.commit([WrittenParts.of(written)], objects={}, extra_files={}, model_prefix=None, aliases={}, blocks=[blocks])
    ['model.safetensors', 'block_checksums.crc32']
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from dcp_safetensors.blocks import (
    MAX_BLOCK,
    BlockReport,
    encode_tables,
    file_crc,
    planned_starts,
    tables_of,
)
from dcp_safetensors.checksum import (
    combine_run_arrays,
    crc32,
    crc32_of_shares,
    crc32_share,
    format_crc32,
)
from dcp_safetensors.errors import ChecksumMismatchError, LayoutError
from dcp_safetensors.index import build_index
from dcp_safetensors.layout import CheckpointLayout, Extents, PartPlan
from dcp_safetensors.names import BLOCKS_FILE, MODEL_GROUP, OBJECTS_FILE, TRAINING_STATE_GROUP
from dcp_safetensors.storage import SaveSession, Storage
from dcp_safetensors.storage.base import PartTags, PartWriter, RunWriter

if TYPE_CHECKING:
    from dcp_safetensors.progress import Progress

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "LayoutSave",
    "WrittenPart",
    "WrittenParts",
    "RunWrite",
    "write_part",
    "write_parts",
    "write_in_place",
    "file_checksum",
]


class WrittenPart(NamedTuple):
    """A part as written: its plan, the CRC-32 of its bytes, and the storage's tag (S3: its ETag)."""

    part: PartPlan
    crc: int
    etag: str | None


def write_part(writer: PartWriter, part: PartPlan, views: Sequence[memoryview]) -> WrittenPart:
    """Write ``part`` (its bytes: ``views`` back to back) and CRC-32 them: the one way every save writes."""
    crc = 0
    for view in views:  # a part's views are consecutive bytes: the CRC runs on across them
        crc = crc32(view, crc)
    return WrittenPart(part, crc, writer.write(part, views, crc))


def write_parts(
    writer: PartWriter,
    parts: Iterable[PartPlan],
    views_of: Callable[[PartPlan], Sequence[memoryview]],
    threads: int,
    progress: Progress | None = None,
) -> list[WrittenPart]:
    """:func:`write_part` of every part, on up to ``threads`` threads; the result is in ``parts`` order.
    ``progress`` counts each part's bytes as it is written; after a part fails, no other starts.

    Threads take runs of consecutive parts of about equal bytes, not one part
    each: a column shard is one part per row on POSIX, and a task per part
    (8,200 for one rank of a 2x2 FSDP x TP save) cost 1.5 s of a 2 s save in
    thread hand-offs alone.

    Example:
        >>> import tempfile
        >>> from dcp_safetensors.storage import open_storage
        >>> storage = open_storage(tempfile.mkdtemp())
        >>> session = storage.begin_save("s", ["f"])
        >>> parts = [PartPlan("f", n + 1, 4 * n, 4 * n + 4, 0) for n in range(3)]
        >>> data = memoryview(b"abcdefghijkl")
        >>> writer = storage.part_writer(session)
        >>> [w.part.number for w in write_parts(writer, parts, lambda p: [data[p.start:p.end]], threads=2)]
        [1, 2, 3]
        >>> writer.close(); storage.abort_save(session)
    """
    parts = list(parts)
    stop = threading.Event()

    def write_batch(batch: list[PartPlan]) -> list[WrittenPart]:
        done = []
        for part in batch:
            if stop.is_set():
                break  # another thread's part failed: its error is the save's
            done.append(write_part(writer, part, views_of(part)))
            if progress is not None:
                progress.add(part.end - part.start)
        return done

    if threads <= 1 or len(parts) <= 1:
        return write_batch(parts)
    target = -(-sum(p.end - p.start for p in parts) // threads)
    batches: list[list[PartPlan]] = [[]]
    size = 0
    for part in parts:
        if size >= target:
            batches.append([])
            size = 0
        batches[-1].append(part)
        size += part.end - part.start
    return [w for done in map_until_failure(write_batch, batches, threads, stop) for w in done]


def map_until_failure(fn: Callable[[T], R], items: Sequence[T], threads: int, stop: threading.Event) -> list[R]:
    """``fn`` of every item on up to ``threads`` threads, in ``items`` order; the first failure sets
    ``stop``, no item starts after it, and it is raised once the items under way have ended.

    A full store or a refusing server fails every write alike: the save should
    learn so once, not after every remaining part has spent its retries.

    Example:
        >>> map_until_failure(lambda n: n * n, [1, 2, 3], 2, threading.Event())
        [1, 4, 9]
    """

    def run(item: T) -> R:
        if stop.is_set():
            raise _Skipped
        try:
            return fn(item)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(max(1, min(threads, len(items))), thread_name_prefix="dcp-safetensors-write") as pool:
        futures = [pool.submit(run, item) for item in items]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None and not isinstance(error, _Skipped):
            raise error
    return [f.result() for f in futures]


class _Skipped(Exception):
    """An item :func:`map_until_failure` did not start, as another had failed."""


class RunWrite(NamedTuple):
    """Bytes a rank writes in place: ``data`` cut into the runs of ``extents`` in ``file``, in order."""

    file: str
    extents: Extents
    data: memoryview


def write_in_place(
    writer: RunWriter, writes: Sequence[RunWrite], file_sizes: Mapping[str, int], *, rank: int, threads: int, piece: int,
    progress: Progress | None = None,
) -> WrittenParts:
    """Write every run of ``writes`` where it lies and CRC-32 it, on up to ``threads`` threads
    (``progress`` counts the bytes; after a write fails, no other starts).

    No part is planned: a column shard's runs (one per row) go out in a tight
    loop, each rank reporting per file only its byte count and its share of
    the file's CRC (:func:`~.checksum.crc32_share`; ``file_sizes`` gives each
    file's size), in the order of ``file_sizes``. Threads take units of about
    ``piece`` bytes: a run longer than that is cut, shorter runs of one chunk
    are grouped.

    Example:
        >>> import tempfile, zlib
        >>> from dcp_safetensors.storage import open_storage
        >>> storage = open_storage(tempfile.mkdtemp())
        >>> session = storage.begin_save("s", ["f"])
        >>> writer = storage.part_writer(session)
        >>> out = write_in_place(writer, [RunWrite("f", Extents(1, 2, (2,), (3,)), memoryview(b"abcd"))],
        ...                      {"f": 6}, rank=0, threads=2, piece=1)
        >>> writer.close(); storage.abort_save(session)
        >>> out.in_place.tolist()[0][:2], crc32_of_shares(6, [out.in_place[0, 2]]) == zlib.crc32(b"_ab_cd".replace(b"_", bytes(1)))
        ([0, 4], True)
    """
    units: list[tuple[str, np.ndarray, int, memoryview]] = []
    for write in writes:
        offsets, length = write.extents.offsets(), write.extents.length
        if length > piece:
            cuts = np.arange(0, length, piece, dtype=np.int64)
            for i, offset in enumerate(offsets.tolist()):
                for cut in cuts.tolist():
                    size = min(piece, length - cut)
                    units.append((write.file, np.array([offset + cut]), size, write.data[i * length + cut :][:size]))
        else:
            step = max(1, piece // max(length, 1))
            for first in range(0, len(offsets), step):
                runs = offsets[first : first + step]
                units.append((write.file, runs, length, write.data[first * length : (first + len(runs)) * length]))

    def write_unit(unit: tuple[str, np.ndarray, int, memoryview]) -> tuple[str, int, int]:
        file, offsets, length, data = unit
        crcs = np.array([crc32(data[i * length : (i + 1) * length]) for i in range(len(offsets))], dtype=np.uint32)
        writer.write_runs(file, offsets.tolist(), length, data)
        if progress is not None:
            progress.add(len(offsets) * length)
        after = file_sizes[file] - offsets - length
        return file, len(offsets) * length, crc32_share(crcs, np.full(len(offsets), length), after)

    order = {name: i for i, name in enumerate(file_sizes)}
    units.sort(key=lambda u: order[u[0]])  # the plan's file order: ranks start at different files
    if threads <= 1 or len(units) <= 1:
        done = [write_unit(u) for u in units]
    else:
        done = map_until_failure(write_unit, units, threads, threading.Event())
    totals: dict[str, list[int]] = {}
    for file, nbytes, share in done:
        total = totals.setdefault(file, [0, 0])
        total[0] += nbytes
        total[1] ^= share
    rows = np.asarray([(i, n, share) for i, (n, share) in enumerate(totals.values())], dtype=np.int64).reshape(-1, 3)
    return WrittenParts(tuple(totals), np.zeros((0, 5), dtype=np.int64), (), rows, rank)


@dataclass(frozen=True, eq=False)
class WrittenParts:
    """What a rank wrote, columnar: its report to the coordinator (one result per rank keeps it small).

    ``rows`` holds ``(file index, number, start, length, crc32)`` per part, the
    file index into ``files``; ``etags`` the storage's tag of each part.
    ``in_place`` holds ``(file index, bytes, crc32 share)`` per file that
    ``rank`` wrote in place (:func:`write_in_place`).
    """

    files: tuple[str, ...]
    rows: np.ndarray
    etags: tuple[str | None, ...]
    in_place: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    rank: int = 0

    @classmethod
    def of(cls, written: Sequence[WrittenPart]) -> WrittenParts:
        """The columnar form of ``written``."""
        files = {name: i for i, name in enumerate(dict.fromkeys(w.part.file for w in written))}
        rows = [(files[w.part.file], w.part.number, w.part.start, w.part.end - w.part.start, w.crc) for w in written]
        return cls(tuple(files), np.asarray(rows, dtype=np.int64).reshape(-1, 5), tuple(w.etag for w in written))

    @property
    def nbytes(self) -> int:
        return int(self.rows[:, 3].sum() + self.in_place[:, 1].sum())


def file_checksum(name: str, size: int, rows: np.ndarray) -> int:
    """The file's CRC-32 if the parts' ``(start, length, crc)`` rows cover ``[0, size)`` exactly once.

    Raises :class:`LayoutError` naming the first hole or overlap otherwise.

    Example:
        >>> import zlib
        >>> file_checksum("f", 3, np.array([[1, 2, zlib.crc32(b"bc")], [0, 1, zlib.crc32(b"a")]])) == zlib.crc32(b"abc")
        True
    """
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    starts, lengths = rows[:, 0], rows[:, 1]
    expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(rows) else starts
    wrong = np.flatnonzero(starts != expected)
    if len(wrong):
        i = int(wrong[0])
        what = "a hole" if starts[i] > expected[i] else "an overlap"
        raise LayoutError(
            f"{name}: written parts leave {what} at byte {int(min(starts[i], expected[i]))}; refusing to commit"
        )
    end = int(lengths.sum())
    if end != size:
        raise LayoutError(f"{name}: written parts end at byte {end}, the file must be {size} bytes; refusing to commit")
    return combine_run_arrays(lengths, rows[:, 2])


def _check_in_place(planned: Mapping[tuple[int, str], int], written: Mapping[tuple[int, str], int]) -> None:
    """Raise :class:`LayoutError` unless every rank wrote exactly the bytes its in-place plan holds, file by file.

    With the plan's proof that the chunks tile every tensor, this proves each
    file written exactly once without a row per run.

    Example:
        >>> _check_in_place({(0, "f"): 8}, {(0, "f"): 4})
        Traceback (most recent call last):
        ...
        dcp_safetensors.errors.LayoutError: f: rank 0 wrote 4 bytes, its plan holds 8; refusing to commit
    """
    for rank, name in sorted(planned.keys() | written.keys(), key=lambda k: (k[1], k[0])):
        want, got = planned.get((rank, name), 0), written.get((rank, name), 0)
        if want != got:
            raise LayoutError(f"{name}: rank {rank} wrote {got} bytes, its plan holds {want}; refusing to commit")


class LayoutSave:
    """The save of one planned layout: its storage session, then its commit or abort.

    Made on the coordinator (``begin_save`` cleans up crashed saves and refuses a
    second live writer); :attr:`session` travels to every rank that writes parts.
    """

    def __init__(self, storage: Storage, layout: CheckpointLayout, snapshot: str) -> None:
        self.storage = storage
        self.layout = layout
        self.session: SaveSession = storage.begin_save(snapshot, [f.name for f in layout.files])

    def commit(
        self,
        written: Iterable[WrittenParts],
        *,
        objects: Mapping[str, dict[str, Any]],
        extra_files: Mapping[str, bytes],
        model_prefix: str | None,
        aliases: Mapping[str, str],
        blocks: Iterable[BlockReport],
    ) -> list[str]:
        """Check and commit: returns the names published (tensor files, then small files).

        ``objects`` are encoded non-tensor values by key (``objects.json``),
        ``extra_files`` small files by name (``config.json``), ``aliases``
        tied names in the files (``{alias: stored name}``), ``blocks`` every
        writer's shares of the block checksums, recorded in
        :data:`~dcp_safetensors.names.BLOCKS_FILE`. The file checksums the
        writes give and those the blocks give must agree (the bytes the ranks
        held are the bytes written). On any error the session is aborted and
        the error raised.
        """
        try:
            rows_of: dict[str, list[np.ndarray]] = defaultdict(list)
            etags: PartTags = defaultdict(list)
            shares: dict[str, list[int]] = defaultdict(list)
            in_place: dict[tuple[int, str], int] = {}
            for parts in written:
                for i, name in enumerate(parts.files):
                    mine = np.flatnonzero(parts.rows[:, 0] == i)
                    rows_of[name].append(parts.rows[mine][:, 2:5])
                    numbers = parts.rows[mine, 1].tolist()
                    tags = [parts.etags[j] for j in mine.tolist()]
                    etags[name].extend(zip(numbers, tags, parts.rows[mine, 4].tolist(), strict=True))
                for i, nbytes, share in parts.in_place.tolist():  # a rank may report several times (rounds)
                    in_place[parts.rank, parts.files[i]] = in_place.get((parts.rank, parts.files[i]), 0) + nbytes
                    shares[parts.files[i]].append(share)
            if self.layout.in_place_bytes or in_place:
                _check_in_place(self.layout.in_place_bytes, in_place)
            empty = np.zeros((0, 3), np.int64)
            crcs = {
                f.name: crc32_of_shares(f.size, shares[f.name]) if self.layout.in_place_bytes
                else file_checksum(f.name, f.size, np.concatenate(rows_of[f.name] or [empty]))
                for f in self.layout.files
            }
            tables = tables_of(planned_starts(self.layout), {f.name: f.size for f in self.layout.files}, blocks)
            for name, table in tables.items():
                held = file_crc(table)
                if held != crcs[name]:
                    raise ChecksumMismatchError(
                        f"{name}: the bytes written have CRC-32 {crcs[name]:08x}, the bytes the ranks held {held:08x}: "
                        "they changed between the ranks' memory and storage; refusing to commit"
                    )
            files = {f.name: (f.size, format_crc32(crcs[f.name]), len(tables[f.name].starts)) for f in self.layout.files}
            published = list(files)
            record = encode_tables([tables[name] for name in sorted(files)])
            self.storage.write_small(self.session, BLOCKS_FILE, record)
            published.append(BLOCKS_FILE)
            objects_file = None
            if objects:
                objects_file = OBJECTS_FILE
                body = json.dumps(dict(sorted(objects.items())), indent=1).encode()
                self.storage.write_small(self.session, objects_file, body)
                published.append(objects_file)
            for name, body in extra_files.items():
                self.storage.write_small(self.session, name, body)
                published.append(name)
            index = build_index(
                snapshot=self.session.snapshot,
                weight_map=self.layout.weight_map(MODEL_GROUP),
                total_size=self.layout.total_size(MODEL_GROUP),
                files=files,
                extra_weight_map=self.layout.weight_map(TRAINING_STATE_GROUP),
                objects_file=objects_file,
                model_prefix=model_prefix,
                aliases=dict(aliases),
                block_checksums={"file": BLOCKS_FILE, "size": len(record), "checksum": format_crc32(crc32(record)),
                                 "max_block": MAX_BLOCK},
            )
            self.storage.commit_save(self.session, published, dict(etags), index, crcs)
        except BaseException:
            self.abort()
            raise
        return published

    def abort(self) -> None:
        """Drop the session's staged files and uploads (before its commit point only)."""
        self.storage.abort_save(self.session)
