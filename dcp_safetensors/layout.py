"""The global byte layout of a checkpoint, planned once from every rank's chunks.

Pure functions: given each tensor's global shape and dtype and every rank's
chunk of it (what DCP's coordinator sees in ``prepare_global_plan``), decide

1. which file each tensor goes to (``max_shard_size``, natural key order),
2. where it sits inside the file (``save_file``'s order: dtype, then name),
3. each file's exact header bytes and size,
4. the byte runs each rank's chunk occupies in its file (:class:`Runs`), and
5. which rank writes each file's header (the owner of its first data byte).

The result, :class:`CheckpointLayout`, is the frozen snapshot: headers, the
index and every rank's writes all derive from it. :func:`check_chunks_tile`
proves, before any byte is written, that each tensor's chunks cover it
exactly once, in O(n log n) for the grid-shaped chunks DTensor produces.

Example:
    >>> specs = [TensorSpec("w", "w", "F32", (4, 2))]
    >>> chunks = [ChunkSpec(0, "w", (0, 0), (2, 2)), ChunkSpec(1, "w", (2, 0), (2, 2))]
    >>> layout = plan_layout(specs, chunks, max_shard_size=10**9, metadata={"format": "pt"})
    >>> [f.name for f in layout.files]
    ['model.safetensors']
    >>> [(w.runs.start, w.runs.length) for w in layout.rank_plans[1].chunks]
    [(112, 16)]
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from dcp_safetensors.errors import ConfigurationError, LayoutError
from dcp_safetensors.format import (
    DTYPE_ITEMSIZE,
    TensorEntry,
    dtype_sort_key,
    encode_header,
    tensor_nbytes,
)

__all__ = [
    "TensorSpec",
    "ChunkSpec",
    "Runs",
    "ChunkWrite",
    "HeaderWrite",
    "RankWritePlan",
    "FileLayout",
    "CheckpointLayout",
    "parse_size",
    "natural_key",
    "chunk_runs",
    "check_chunks_tile",
    "plan_layout",
    "plan_parts",
    "plan_rounds",
    "PartPlan",
    "Transfer",
    "TransferRound",
    "file_names",
]

MODEL_GROUP = "model"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the checkpoint: its DCP key, its name in the file, dtype, global shape.

    ``group`` is the file stem the tensor belongs to (``"model"`` for the HF
    files; another stem, e.g. ``"training_state/state"``, for tensors kept out
    of the weight map).
    """

    key: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    group: str = MODEL_GROUP

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class ChunkSpec:
    """The box ``[offsets, offsets + sizes)`` of tensor ``key`` that ``rank`` holds and writes."""

    rank: int
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class Runs:
    """Where a chunk's bytes go: ``prod(counts)`` runs of ``length`` bytes.

    Run ``i`` (row-major over ``counts``) holds bytes ``[i*length, (i+1)*length)``
    of the chunk's contiguous row-major copy and starts at absolute file offset
    ``start + sum(idx[d] * strides[d])``. A chunk spanning every trailing dim
    (``Shard(0)``) is one run; a column shard (``Shard(1)``) one run per row.

    Example:
        >>> Runs(100, 8, (3,), (32,)).offsets().tolist()
        [100, 132, 164]
    """

    start: int
    length: int
    counts: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return math.prod(self.counts)

    @property
    def nbytes(self) -> int:
        return self.count * self.length

    def offsets(self) -> np.ndarray:
        """Absolute file offset of every run, in the chunk's byte order (int64 array)."""
        out = np.array([self.start], dtype=np.int64)
        for count, stride in zip(self.counts, self.strides, strict=False):
            out = (out[:, None] + np.arange(count, dtype=np.int64)[None, :] * stride).reshape(-1)
        return out


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk a rank writes: the DCP item it comes from and the runs it fills in ``file``."""

    key: str
    offsets: tuple[int, ...]
    file: str
    runs: Runs


@dataclass(frozen=True)
class HeaderWrite:
    """The header bytes a rank writes at offset 0 of ``file``."""

    file: str
    data: bytes


@dataclass(frozen=True)
class PartPlan:
    """Bytes ``[start, end)`` of ``file``, written by ``rank`` as part ``number`` (1-based).

    On POSIX storage a part is written with ``pwrite``; on an object store it
    is one ``UploadPart`` of the file's multipart upload.
    """

    file: str
    number: int
    start: int
    end: int
    rank: int


@dataclass(frozen=True)
class Transfer:
    """Bytes ``[offset, offset + length)`` of ``file`` that ``src`` holds and ``dst`` writes."""

    src: int
    dst: int
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class TransferRound:
    """One ``all_to_all`` exchange: what this rank sends and receives, in wire order."""

    sends: tuple[Transfer, ...] = ()
    recvs: tuple[Transfer, ...] = ()


@dataclass(frozen=True)
class RankWritePlan:
    """Everything one rank does in ``write_data``; travels in its ``SavePlan.storage_data``.

    ``chunks`` and ``headers`` are the bytes this rank holds; ``rounds`` move
    the bytes of other ranks' parts (every rank runs the same number of
    rounds); ``parts`` are what it writes.
    """

    chunks: tuple[ChunkWrite, ...] = ()
    headers: tuple[HeaderWrite, ...] = ()
    parts: tuple[PartPlan, ...] = ()
    rounds: tuple[TransferRound, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.parts)


@dataclass(frozen=True)
class FileLayout:
    """One output file: its relative name, header bytes, tensor entries (file order), size."""

    name: str
    group: str
    header: bytes
    entries: tuple[TensorEntry, ...]

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @property
    def size(self) -> int:
        return self.data_start + self.data_size


@dataclass(frozen=True)
class CheckpointLayout:
    """The frozen layout of a whole checkpoint."""

    files: tuple[FileLayout, ...]
    tensors: tuple[TensorSpec, ...]
    rank_plans: Mapping[int, RankWritePlan] = field(default_factory=dict)

    def weight_map(self, group: str = MODEL_GROUP) -> dict[str, str]:
        """``{name in file: file name}`` for the tensors of ``group``."""
        return {e.name: f.name for f in self.files if f.group == group for e in f.entries}

    def total_size(self, group: str = MODEL_GROUP) -> int:
        """Sum of the tensor bytes of ``group`` (HF's ``metadata.total_size``)."""
        return sum(e.nbytes for f in self.files if f.group == group for e in f.entries)


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes in ``size`` as transformers reads ``max_shard_size``.

    An int is bytes; ``"5GB"`` is ``5 * 10**9``; ``"5GiB"`` is ``5 * 2**30``;
    a lower-case ``b`` after a decimal unit means bits, as in transformers
    (``"8Mb"`` is 10**6 bytes).

    Example:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigurationError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(size)
        if not m:
            raise ConfigurationError(
                f"max_shard_size {size!r} is not a size: use an int (bytes) or e.g. '5GB', '500MB', '2GiB'"
            )
        number, unit = m.groups()
        factor = _SIZE_UNITS.get(unit.upper())
        if factor is None:  # the pattern also lets through e.g. "5K", "5i", "5GI"
            raise ConfigurationError(
                f"max_shard_size {size!r} has an unknown unit {unit!r}: use e.g. '5GB', '500MB', '2GiB'"
            )
        value = int(Fraction(number) * factor)  # exact: "1.005KB" is 1005, not 1004
        if unit.endswith("b") and "i" not in unit.lower() and unit.upper() != "B":
            value //= 8
    if value <= 0:
        raise ConfigurationError(f"max_shard_size must be positive, got {size!r}")
    return value


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``layers.2`` before ``layers.10``.

    Example:
        >>> sorted(["l.10.w", "l.2.w"], key=natural_key)
        ['l.2.w', 'l.10.w']
    """
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def file_names(stem: str, count: int) -> list[str]:
    """HF file names for ``count`` files of ``stem``.

    Example:
        >>> file_names("model", 1), file_names("model", 2)
        (['model.safetensors'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def chunk_runs(
    shape: Sequence[int], itemsize: int, offsets: Sequence[int], sizes: Sequence[int], base: int = 0
) -> Runs:
    """The byte runs of the box ``[offsets, offsets + sizes)`` of a row-major tensor at ``base``.

    Example:
        >>> chunk_runs((4, 6), 4, (0, 3), (4, 3))  # a Shard(1) half: one run per row
        Runs(start=12, length=12, counts=(4,), strides=(24,))
        >>> chunk_runs((4, 6), 4, (2, 0), (2, 6))  # a Shard(0) half: one run
        Runs(start=48, length=48, counts=(), strides=())
    """
    if math.prod(sizes) == 0:
        return Runs(base, 0, (0,), (0,))
    strides = _row_major_strides(shape)
    start = base + sum(o * s for o, s in zip(offsets, strides, strict=False)) * itemsize
    split = next((d for d in range(len(shape) - 1, -1, -1) if sizes[d] != shape[d]), -1)
    if split < 0:
        return Runs(start, math.prod(shape) * itemsize)
    length = sizes[split] * strides[split] * itemsize
    outer = [(sizes[d], strides[d] * itemsize) for d in range(split) if sizes[d] != 1]
    return Runs(start, length, tuple(c for c, _ in outer), tuple(s for _, s in outer))


def _describe(c: ChunkSpec) -> str:
    return f"rank {c.rank} chunk offsets={list(c.offsets)} sizes={list(c.sizes)}"


def check_chunks_tile(spec: TensorSpec, chunks: Sequence[ChunkSpec]) -> None:
    """Raise :class:`LayoutError` unless ``chunks`` cover ``spec`` exactly once.

    In bounds, pairwise disjoint, and volumes summing to ``numel`` together
    mean an exact tiling. Disjointness is checked by sweeping the dim with the
    most distinct chunk offsets (the sharded one), so only chunks that share
    that dim's interval are compared: linear for ``Shard(0)``/``Shard(1)``.

    Example:
        >>> s = TensorSpec("w", "w", "F32", (4,))
        >>> check_chunks_tile(s, [ChunkSpec(0, "w", (0,), (2,)), ChunkSpec(1, "w", (2,), (2,))])
        >>> check_chunks_tile(s, [ChunkSpec(0, "w", (0,), (3,)), ChunkSpec(1, "w", (2,), (2,))])
        Traceback (most recent call last):
        dcp_safetensors.errors.LayoutError: tensor 'w': rank 0 chunk offsets=[0] sizes=[3] overlaps rank 1 chunk offsets=[2] sizes=[2]
    """
    ndim = len(spec.shape)
    live = []
    for c in chunks:
        if len(c.offsets) != ndim or len(c.sizes) != ndim:
            raise LayoutError(f"tensor {spec.key!r}: {_describe(c)} does not have the tensor's {ndim} dims")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, spec.shape, strict=False)):
            raise LayoutError(
                f"tensor {spec.key!r}: {_describe(c)} lies outside the global shape {list(spec.shape)}"
            )
        if c.numel:
            live.append(c)
    numel = math.prod(spec.shape)
    if ndim == 0:
        if len(live) != 1:
            ranks = sorted(c.rank for c in live)
            raise LayoutError(
                f"tensor {spec.key!r}: a 0-dim tensor needs exactly one writer, got ranks {ranks}"
            )
        return
    if live:
        dim = max(range(ndim), key=lambda d: len({c.offsets[d] for c in live}))
        active: list[ChunkSpec] = []
        for c in sorted(live, key=lambda c: c.offsets[dim]):
            active = [a for a in active if a.offsets[dim] + a.sizes[dim] > c.offsets[dim]]
            for a in active:
                if all(
                    a.offsets[d] < c.offsets[d] + c.sizes[d] and c.offsets[d] < a.offsets[d] + a.sizes[d]
                    for d in range(ndim)
                ):
                    raise LayoutError(f"tensor {spec.key!r}: {_describe(a)} overlaps {_describe(c)}")
            active.append(c)
    covered = sum(c.numel for c in live)
    if covered != numel:
        raise LayoutError(
            f"tensor {spec.key!r}: chunks from ranks {sorted({c.rank for c in live})} cover {covered} "
            f"of {numel} elements of shape {list(spec.shape)} (a rank's shard is missing from the plan)"
        )


def _assign_files(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    files: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    used = 0
    for spec in sorted(specs, key=lambda s: natural_key(s.name)):
        if current and used + spec.nbytes > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(spec)
        used += spec.nbytes
    if current:
        files.append(current)
    return files


def _build_file(name: str, group: str, specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> FileLayout:
    entries = []
    position = 0
    for spec in sorted(specs, key=lambda s: dtype_sort_key(s.dtype, s.name)):
        entries.append(TensorEntry(spec.name, spec.dtype, spec.shape, position, position + spec.nbytes))
        position += spec.nbytes
    return FileLayout(name, group, encode_header(entries, metadata), tuple(entries))


def plan_layout(
    tensors: Sequence[TensorSpec],
    chunks: Sequence[ChunkSpec],
    *,
    max_shard_size: int | str,
    metadata: Mapping[str, str],
    min_part: int = 1,
    max_part: int | None = None,
    transfer_budget: int = 256 << 20,
    world_size: int | None = None,
) -> CheckpointLayout:
    """Plan files, headers, parts, transfers and every rank's writes for one checkpoint.

    ``tensors`` lists each tensor once; ``chunks`` holds every rank's chunk
    (after DCP's dedup of replicated items). ``min_part``/``max_part`` are the
    storage's rules for one writer's contiguous byte run (see
    :func:`plan_parts`); ``transfer_budget`` bounds the bytes one rank sends or
    receives per round. Raises :class:`LayoutError` if two tensors share a name
    within a group, a chunk names an unknown tensor, or a tensor's chunks do
    not tile it exactly.
    """
    max_bytes = parse_size(max_shard_size)
    by_key: dict[str, TensorSpec] = {}
    names: dict[tuple[str, str], str] = {}
    for spec in tensors:
        if spec.dtype not in DTYPE_ITEMSIZE:
            raise LayoutError(f"tensor {spec.key!r}: dtype {spec.dtype!r} has no safetensors equivalent")
        if spec.key in by_key:
            raise LayoutError(f"tensor {spec.key!r} is listed twice")
        other = names.setdefault((spec.group, spec.name), spec.key)
        if other != spec.key:
            raise LayoutError(
                f"keys {other!r} and {spec.key!r} both map to {spec.name!r} in {spec.group}.safetensors"
            )
        by_key[spec.key] = spec
    chunks_of: dict[str, list[ChunkSpec]] = defaultdict(list)
    for c in chunks:
        if c.key not in by_key:
            raise LayoutError(f"{_describe(c)} names tensor {c.key!r}, which no plan declares")
        chunks_of[c.key].append(c)
    for spec in tensors:
        check_chunks_tile(spec, chunks_of[spec.key])

    groups: dict[str, list[TensorSpec]] = defaultdict(list)
    for spec in tensors:
        groups[spec.group].append(spec)
    files: list[FileLayout] = []
    for group in sorted(groups):
        assigned = _assign_files(groups[group], max_bytes)
        for fname, members in zip(file_names(group, len(assigned)), assigned, strict=False):
            files.append(_build_file(fname, group, members, metadata))

    placement: dict[tuple[str, str], tuple[FileLayout, TensorEntry]] = {
        (e.name, f.group): (f, e) for f in files for e in f.entries
    }
    writes: dict[int, list[ChunkWrite]] = defaultdict(list)
    owned: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for c in chunks:
        if not c.numel:
            continue
        spec = by_key[c.key]
        f, entry = placement[spec.name, spec.group]
        runs = chunk_runs(spec.shape, DTYPE_ITEMSIZE[spec.dtype], c.offsets, c.sizes, f.data_start + entry.begin)
        writes[c.rank].append(ChunkWrite(c.key, c.offsets, f.name, runs))
        owned[f.name].extend((int(o), int(o) + runs.length, c.rank) for o in runs.offsets())
    headers: dict[int, list[HeaderWrite]] = defaultdict(list)
    parts: dict[int, list[PartPlan]] = defaultdict(list)
    transfers: list[Transfer] = []
    for f in files:
        runs_of_file = sorted(owned[f.name])
        # The header goes with the file's first data byte, so a file's first part needs no transfer.
        header_rank = runs_of_file[0][2] if runs_of_file and runs_of_file[0][0] == f.data_start else 0
        headers[header_rank].append(HeaderWrite(f.name, f.header))
        runs_of_file.insert(0, (0, f.data_start, header_rank))
        for part in plan_parts(f.name, f.size, runs_of_file, min_part=min_part, max_part=max_part):
            parts[part.rank].append(part)
            transfers.extend(_foreign_bytes(part, runs_of_file))
    rounds = plan_rounds(transfers, transfer_budget)
    ranks = set(writes) | set(headers) | set(parts) | set(range(world_size or 0))
    plans = {
        r: RankWritePlan(
            tuple(writes[r]),
            tuple(headers[r]),
            tuple(parts[r]),
            tuple(
                TransferRound(tuple(t for t in rnd if t.src == r), tuple(t for t in rnd if t.dst == r))
                for rnd in rounds
            ),
        )
        for r in sorted(ranks)
    }
    return CheckpointLayout(tuple(files), tuple(tensors), plans)


MAX_PARTS = 10_000


def plan_parts(
    file: str,
    size: int,
    owned: Sequence[tuple[int, int, int]],
    *,
    min_part: int,
    max_part: int | None = None,
    max_parts: int = MAX_PARTS,
) -> list[PartPlan]:
    """Cut a file into parts, each at least ``min_part`` bytes (but the last) and at most ``max_part``.

    ``owned`` lists ``(start, end, rank)`` ranges tiling ``[0, size)`` in
    order: who holds which bytes. Parts follow ownership boundaries where the
    rules allow, so large shards are written by their holder with nothing
    moved; each part goes to the rank holding most of its bytes. With
    ``min_part = 1`` and no ``max_part`` (POSIX), every part is one holder's
    maximal contiguous range.

    Example:
        >>> plan_parts("f", 12, [(0, 3, 0), (3, 12, 1)], min_part=4, max_part=8)
        [PartPlan(file='f', number=1, start=0, end=4, rank=0), PartPlan(file='f', number=2, start=4, end=12, rank=1)]
    """
    if min_part < 1:
        raise ConfigurationError(f"min_part must be >= 1, got {min_part}")
    limit = max(max_part or size, min_part, -(-size // max_parts))
    spans: list[list[int]] = []
    for start, end, rank in owned:
        if spans and spans[-1][2] == rank and spans[-1][1] == start:
            spans[-1][1] = end
        else:
            spans.append([start, end, rank])
    cuts: list[tuple[int, int]] = []
    pos, i = 0, 0
    while pos < size:
        while spans[i][1] <= pos:
            i += 1
        remaining = spans[i][1] - pos
        if remaining >= min_part:
            # Equal pieces of at most ``limit``; but never below min_part (S3 enforces that
            # one, so a run that cannot satisfy both gets pieces a little over ``limit``).
            pieces = min(-(-remaining // limit), remaining // min_part)
            end = pos + -(-remaining // pieces)
        elif pos + min_part >= size:
            end = size
        else:
            # The part must reach into later holders' bytes: end it either exactly at
            # min_part or at the next holder boundary, whichever moves fewer bytes.
            j = i
            while spans[j][1] < pos + min_part:
                j += 1
            end = pos + min_part
            if spans[j][1] - pos <= limit and _foreign(spans, i, pos, spans[j][1]) <= _foreign(spans, i, pos, end):
                end = spans[j][1]
        cuts.append((pos, end))
        pos = end
    parts = []
    i = 0
    for number, (start, end) in enumerate(cuts, 1):
        held: dict[int, int] = defaultdict(int)
        while spans[i][1] <= start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < end:
            held[spans[j][2]] += min(end, spans[j][1]) - max(start, spans[j][0])
            j += 1
        rank = max(sorted(held), key=lambda r: held[r])
        parts.append(PartPlan(file, number, start, end, rank))
    return parts


def _foreign(spans: Sequence[Sequence[int]], i: int, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` not held by its main holder (``spans[i]`` contains ``start``)."""
    held: dict[int, int] = defaultdict(int)
    while i < len(spans) and spans[i][0] < end:
        held[spans[i][2]] += min(end, spans[i][1]) - max(start, spans[i][0])
        i += 1
    return (end - start) - max(held.values())


def _foreign_bytes(part: PartPlan, owned: Sequence[tuple[int, int, int]]) -> list[Transfer]:
    """The transfers that bring a part's bytes held by other ranks to its writer."""
    out: list[Transfer] = []
    lo = bisect.bisect_right(owned, (part.start, float("inf"))) - 1
    for start, end, rank in owned[max(lo, 0) :]:
        if start >= part.end:
            break
        a, b = max(start, part.start), min(end, part.end)
        if b > a and rank != part.rank:
            if out and out[-1].src == rank and out[-1].offset + out[-1].length == a:
                out[-1] = dataclasses.replace(out[-1], length=out[-1].length + b - a)
            else:
                out.append(Transfer(rank, part.rank, part.file, a, b - a))
    return out


def plan_rounds(transfers: Sequence[Transfer], budget: int) -> list[list[Transfer]]:
    """Group transfers into rounds in which no rank sends or receives more than ``budget`` bytes.

    A transfer larger than the budget is split. Every rank runs every round.

    Example:
        >>> [len(r) for r in plan_rounds([Transfer(0, 1, "f", 0, 6), Transfer(1, 0, "f", 6, 2)], 4)]
        [1, 2]
    """
    pieces = []
    for t in transfers:
        for off in range(0, t.length, budget):
            pieces.append(dataclasses.replace(t, offset=t.offset + off, length=min(budget, t.length - off)))
    rounds: list[list[Transfer]] = []
    sent: dict[int, int] = defaultdict(int)
    received: dict[int, int] = defaultdict(int)
    for t in pieces:
        if not rounds or sent[t.src] + t.length > budget or received[t.dst] + t.length > budget:
            rounds.append([])
            sent.clear()
            received.clear()
        rounds[-1].append(t)
        sent[t.src] += t.length
        received[t.dst] += t.length
    return rounds
