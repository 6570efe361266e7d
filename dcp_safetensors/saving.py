"""One save of a planned layout, from ``begin_save`` to the commit.

:class:`~dcp_safetensors.writer.SafetensorsWriter` (every rank's parts, over
DCP's calls) and :func:`~dcp_safetensors.convert.convert` (one process
streaming a source) save the same way, through this module:

1. :class:`LayoutSave` opens the storage's session for the layout's files;
2. every part is written by :func:`write_part` (:func:`write_parts` on a
   few threads), which CRC-32s its bytes and returns a :class:`WrittenPart`; a rank's parts travel to the coordinator
   as one columnar :class:`WrittenParts`;
3. :meth:`LayoutSave.commit` proves the written parts cover every file exactly
   once, combines their CRCs into each file's checksum, writes
   ``objects.json`` and the config files, builds the index and commits.
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
    >>> save.commit([WrittenParts.of(written)], objects={}, extra_files={}, model_prefix=None, aliases={})
    ['model.safetensors']
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from dcp_safetensors.checksum import combine_run_arrays, crc32, format_crc32
from dcp_safetensors.errors import LayoutError
from dcp_safetensors.index import build_index
from dcp_safetensors.layout import CheckpointLayout, PartPlan
from dcp_safetensors.names import MODEL_GROUP, OBJECTS_FILE, TRAINING_STATE_GROUP
from dcp_safetensors.storage import SaveSession, Storage
from dcp_safetensors.storage.base import PartWriter

__all__ = ["LayoutSave", "WrittenPart", "WrittenParts", "write_part", "write_parts", "file_checksum"]


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
    return WrittenPart(part, crc, writer.write(part, views))


def write_parts(
    writer: PartWriter,
    parts: Iterable[PartPlan],
    views_of: Callable[[PartPlan], Sequence[memoryview]],
    threads: int,
) -> list[WrittenPart]:
    """:func:`write_part` of every part, on up to ``threads`` threads; the result is in ``parts`` order.

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
    if threads <= 1 or len(parts) <= 1:
        return [write_part(writer, p, views_of(p)) for p in parts]
    target = -(-sum(p.end - p.start for p in parts) // threads)
    batches: list[list[PartPlan]] = [[]]
    size = 0
    for part in parts:
        if size >= target:
            batches.append([])
            size = 0
        batches[-1].append(part)
        size += part.end - part.start

    def write_batch(batch: list[PartPlan]) -> list[WrittenPart]:
        return [write_part(writer, p, views_of(p)) for p in batch]

    with ThreadPoolExecutor(min(threads, len(batches)), thread_name_prefix="dcp-safetensors-write") as pool:
        return [w for done in pool.map(write_batch, batches) for w in done]


@dataclass(frozen=True, eq=False)
class WrittenParts:
    """Written parts, columnar: what a rank reports to the coordinator (one result per rank keeps it small).

    ``rows`` holds ``(file index, number, start, length, crc32)`` per part, the
    file index into ``files``; ``etags`` the storage's tag of each part.
    """

    files: tuple[str, ...]
    rows: np.ndarray
    etags: tuple[str | None, ...]

    @classmethod
    def of(cls, written: Sequence[WrittenPart]) -> WrittenParts:
        """The columnar form of ``written``."""
        files = {name: i for i, name in enumerate(dict.fromkeys(w.part.file for w in written))}
        rows = [(files[w.part.file], w.part.number, w.part.start, w.part.end - w.part.start, w.crc) for w in written]
        return cls(tuple(files), np.asarray(rows, dtype=np.int64).reshape(-1, 5), tuple(w.etag for w in written))

    @property
    def nbytes(self) -> int:
        return int(self.rows[:, 3].sum())


def file_checksum(name: str, size: int, rows: np.ndarray) -> str:
    """The file's CRC-32 (``"crc32:..."``) if the parts' ``(start, length, crc)`` rows cover ``[0, size)`` exactly once.

    Raises :class:`LayoutError` naming the first hole or overlap otherwise.

    Example:
        >>> import zlib
        >>> file_checksum("f", 3, np.array([[1, 2, zlib.crc32(b"bc")], [0, 1, zlib.crc32(b"a")]])) == \\
        ...     f"crc32:{zlib.crc32(b'abc'):08x}"
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
    return format_crc32(combine_run_arrays(lengths, rows[:, 2]))


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
    ) -> list[str]:
        """Check and commit: returns the names published (tensor files, then small files).

        ``objects`` are encoded non-tensor values by key (``objects.json``),
        ``extra_files`` small files by name (``config.json``), ``aliases``
        tied names in the files (``{alias: stored name}``). On any error the
        session is aborted and the error raised.
        """
        try:
            rows_of: dict[str, list[np.ndarray]] = defaultdict(list)
            etags: dict[str, list[tuple[int, Any]]] = defaultdict(list)
            for parts in written:
                for i, name in enumerate(parts.files):
                    mine = np.flatnonzero(parts.rows[:, 0] == i)
                    rows_of[name].append(parts.rows[mine][:, 2:5])
                    numbers = parts.rows[mine, 1].tolist()
                    etags[name].extend(zip(numbers, [parts.etags[j] for j in mine.tolist()], strict=True))
            empty = np.zeros((0, 3), np.int64)
            files = {f.name: (f.size, file_checksum(f.name, f.size, np.concatenate(rows_of[f.name] or [empty])))
                     for f in self.layout.files}
            published = list(files)
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
            )
            self.storage.commit_save(self.session, published, dict(etags), index)
        except BaseException:
            self.abort()
            raise
        return published

    def abort(self) -> None:
        """Drop the session's staged files and uploads (before its commit point only)."""
        self.storage.abort_save(self.session)
