"""The global byte layout of a checkpoint, planned once from every rank's chunks.

Pure functions: given each tensor's global shape and dtype and every rank's
chunk of it (what DCP's coordinator sees in ``prepare_global_plan``), decide

1. which file each tensor goes to (``max_shard_size``, natural key order),
2. where it sits inside the file (``save_file``'s order: dtype, then name),
3. each file's exact header bytes and size,
4. the byte runs each rank's chunk occupies in its file (:class:`Runs`), and
5. which rank writes each file's header (the owner of its first data byte).

The result, :class:`CheckpointLayout`, is the frozen snapshot: headers, the
index and every rank's writes all derive from it. :func:`check_tiling`
proves, before any byte is written, that each tensor's chunks cover it
exactly once, in O(n log n) for the grid-shaped chunks DTensor produces.

Built for thousands of ranks: chunks travel as per-tensor numpy arrays
(:class:`ChunkArrays`), runs and parts are computed a tensor or a file at a
time, and each rank's :class:`RankWritePlan` holds only where its own
tensors sit and the parts it writes; the rank turns its chunks into byte
runs itself (:meth:`RankWritePlan.chunk_writes`).

Example:
    >>> specs = [TensorSpec("w", "w", "F32", (4, 2))]
    >>> chunks = [ChunkSpec(0, "w", (0, 0), (2, 2)), ChunkSpec(1, "w", (2, 0), (2, 2))]
    >>> layout = plan_layout(specs, chunks, max_shard_size=10**9, metadata={"format": "pt"})
    >>> [f.name for f in layout.files]
    ['model.safetensors']
    >>> [(w.runs.start, w.runs.length) for w in layout.rank_plans[1].chunk_writes([("w", (2, 0), (2, 2))])]
    [(112, 16)]
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

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
    "TensorPlacement",
    "PartTable",
    "ChunkArrays",
    "chunk_table",
    "check_tiling",
    "restamp",
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
class TensorPlacement:
    """Where a tensor's bytes sit: ``file``, the absolute offset of its first byte, shape, itemsize.

    Example:
        >>> TensorPlacement("model.safetensors", 96, (4, 6), 4).runs((0, 3), (4, 3))
        Runs(start=108, length=12, counts=(4,), strides=(24,))
    """

    file: str
    start: int
    shape: tuple[int, ...]
    itemsize: int

    def runs(self, offsets: Sequence[int], sizes: Sequence[int]) -> Runs:
        """The file runs of the box ``[offsets, offsets + sizes)`` of this tensor."""
        return chunk_runs(self.shape, self.itemsize, offsets, sizes, self.start)


@dataclass(frozen=True, eq=False)
class PartTable:
    """The parts one rank writes, columnar: per file, an int64 array of ``(number, start, end)`` rows.

    Iterating yields :class:`PartPlan` objects; the arrays keep a plan for
    thousands of parts small to build, pickle and send.
    """

    rank: int
    files: tuple[str, ...] = ()
    rows: tuple[np.ndarray, ...] = ()

    def __iter__(self) -> Iterator[PartPlan]:
        for file, rows in zip(self.files, self.rows, strict=True):
            for number, start, end in rows.tolist():
                yield PartPlan(file, number, start, end, self.rank)

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def nbytes(self) -> int:
        return int(sum(int((r[:, 2] - r[:, 1]).sum()) for r in self.rows))


@dataclass(frozen=True, eq=False)
class RankWritePlan:
    """Everything one rank does in ``write_data``; travels in its ``SavePlan.storage_data``.

    Only what this rank needs, so its size follows the rank's own chunks, not
    the world size: where each tensor it holds sits (``tensors``; the rank
    turns its chunks into byte runs itself, :meth:`chunk_writes`), the
    ``headers`` it writes, its ``parts`` and the transfer ``rounds`` that
    bring other ranks' bytes of those parts (every rank runs the same number
    of rounds).
    """

    rank: int = 0
    tensors: Mapping[str, TensorPlacement] = field(default_factory=dict)
    headers: tuple[HeaderWrite, ...] = ()
    part_table: PartTable = field(default_factory=lambda: PartTable(0))
    rounds: tuple[TransferRound, ...] = ()

    @property
    def parts(self) -> tuple[PartPlan, ...]:
        return tuple(self.part_table)

    @property
    def nbytes(self) -> int:
        return self.part_table.nbytes

    def chunk_write(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> ChunkWrite | None:
        """Where this rank's chunk ``[offsets, offsets + sizes)`` of ``key`` goes; ``None`` if empty.

        Raises :class:`LayoutError` for a non-empty chunk of a tensor the plan
        did not place on this rank (the rank's chunks changed since planning).
        """
        if len(sizes) and math.prod(sizes) == 0:
            return None
        placement = self.tensors.get(key)
        if placement is None:
            raise LayoutError(f"rank {self.rank}: tensor {key!r} has no place in this save's plan")
        return ChunkWrite(key, tuple(offsets), placement.file, placement.runs(offsets, sizes))

    def chunk_writes(self, chunks: Iterable[tuple[str, Sequence[int], Sequence[int]]]) -> list[ChunkWrite]:
        """:meth:`chunk_write` of each ``(key, offsets, sizes)``, empty chunks left out."""
        return [w for c in chunks if (w := self.chunk_write(*c)) is not None]


class ChunkArrays(NamedTuple):
    """Every chunk of one tensor, columnar: ``ranks`` ``(k,)``, ``offsets`` and ``sizes`` ``(k, ndim)`` (int64)."""

    ranks: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray

    def specs(self, key: str) -> list[ChunkSpec]:
        return [
            ChunkSpec(r, key, tuple(o), tuple(z))
            for r, o, z in zip(self.ranks.tolist(), self.offsets.tolist(), self.sizes.tolist(), strict=True)
        ]


def chunk_table(chunks: Iterable[ChunkSpec | tuple[int, str, Sequence[int], Sequence[int]]]) -> dict[str, ChunkArrays]:
    """Group chunks by tensor into :class:`ChunkArrays`.

    Accepts :class:`ChunkSpec` objects or ``(rank, key, offsets, sizes)``
    tuples; raises :class:`LayoutError` if one tensor's chunks disagree on
    their number of dims.

    Example:
        >>> t = chunk_table([ChunkSpec(0, "w", (0,), (2,)), ChunkSpec(1, "w", (2,), (2,))])
        >>> t["w"].ranks.tolist(), t["w"].offsets.tolist()
        ([0, 1], [[0], [2]])
    """
    grouped: dict[str, tuple[list[int], list[Sequence[int]], list[Sequence[int]]]] = {}
    for c in chunks:
        rank, key, offsets, sizes = (c.rank, c.key, c.offsets, c.sizes) if isinstance(c, ChunkSpec) else c
        g = grouped.get(key)
        if g is None:
            g = grouped[key] = ([], [], [])
        g[0].append(rank)
        g[1].append(offsets)
        g[2].append(sizes)
    table = {}
    for key, (ranks, offsets_of, sizes_of) in grouped.items():
        ndims = {len(o) for o in offsets_of} | {len(z) for z in sizes_of}
        if len(ndims) != 1:
            raise LayoutError(f"tensor {key!r}: chunks with {sorted(ndims)} dims; one tensor's chunks share its dims")
        ndim = ndims.pop()
        table[key] = ChunkArrays(
            np.asarray(ranks, dtype=np.int64),
            np.asarray(offsets_of, dtype=np.int64).reshape(len(ranks), ndim),
            np.asarray(sizes_of, dtype=np.int64).reshape(len(ranks), ndim),
        )
    return table


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


@dataclass(frozen=True, eq=False)
class CheckpointLayout:
    """The frozen layout of a whole checkpoint."""

    files: tuple[FileLayout, ...]
    tensors: tuple[TensorSpec, ...]
    rank_plans: Mapping[int, RankWritePlan] = field(default_factory=dict)
    chunks: Mapping[str, ChunkArrays] = field(default_factory=dict)

    def chunk_writes(self, rank: int) -> list[ChunkWrite]:
        """What ``rank`` writes of its own chunks (what :meth:`RankWritePlan.chunk_writes` gives that rank)."""
        mine = [c for key, arrays in self.chunks.items() for c in arrays.specs(key) if c.rank == rank]
        return self.rank_plans[rank].chunk_writes((c.key, c.offsets, c.sizes) for c in mine)

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


def check_tiling(spec: TensorSpec, chunks: ChunkArrays | None) -> None:
    """Raise :class:`LayoutError` unless ``chunks`` cover ``spec`` exactly once; vectorized.

    The chunks DTensor makes (any mesh, ``Shard``/``_StridedShard``, uneven
    sizes) are the cells of a grid: each dim is cut at every chunk boundary,
    and each chunk is exactly one cell. Then the chunks tile the tensor iff
    they are in bounds, no two share a cell and every cell has one:
    O(k log k) with numpy, no pairwise test. Chunks off any grid (or a
    failing check, to name the chunks at fault) take :func:`check_chunks_tile`.

    Example:
        >>> s = TensorSpec("w", "w", "F32", (4, 4))
        >>> check_tiling(s, chunk_table([ChunkSpec(r, "w", (2 * (r // 2), 2 * (r % 2)), (2, 2)) for r in range(4)])["w"])
        >>> check_tiling(s, chunk_table([ChunkSpec(r, "w", (2 * (r // 2), 0), (2, 4)) for r in range(3)])["w"])
        Traceback (most recent call last):
        dcp_safetensors.errors.LayoutError: tensor 'w': rank 0 chunk offsets=[0, 0] sizes=[2, 4] overlaps rank 1 chunk offsets=[0, 0] sizes=[2, 4]
    """
    ndim = len(spec.shape)
    if chunks is None or not len(chunks.ranks):
        check_chunks_tile(spec, [])
        return
    if ndim == 0 or chunks.offsets.shape[1] != ndim or not _grid_tiles(spec.shape, chunks.offsets, chunks.sizes):
        check_chunks_tile(spec, chunks.specs(spec.key))


def _grid_tiles(shape: tuple[int, ...], offsets: np.ndarray, sizes: np.ndarray) -> bool:
    """True if the boxes are in bounds and are exactly the cells of the grid their boundaries cut."""
    dims = np.asarray(shape, dtype=np.int64)
    ends = offsets + sizes
    if (offsets < 0).any() or (sizes < 0).any() or (ends > dims).any():
        return False
    live = sizes.prod(axis=1) > 0
    if not math.prod(shape):
        return not live.any()
    offsets, ends = offsets[live], ends[live]
    cells = np.zeros(len(offsets), dtype=np.int64)
    grid = 1
    for d in range(len(shape)):
        cuts = np.unique(np.concatenate([offsets[:, d], ends[:, d], [0, shape[d]]]))
        lo = np.searchsorted(cuts, offsets[:, d])
        if (np.searchsorted(cuts, ends[:, d]) - lo != 1).any():
            return False  # a chunk spans several cells: not a grid, check pairwise
        grid *= len(cuts) - 1
        if grid > len(offsets):
            return False  # more cells than chunks: a hole (or an overlap)
        cells = cells * (len(cuts) - 1) + lo
    return grid == len(offsets) and len(np.unique(cells)) == grid


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
    chunks: Sequence[ChunkSpec] | Mapping[str, ChunkArrays],
    *,
    max_shard_size: int | str,
    metadata: Mapping[str, str],
    min_part: int = 1,
    max_part: int | None = None,
    transfer_budget: int = 256 << 20,
    world_size: int | None = None,
    tiling_checked: bool = False,
) -> CheckpointLayout:
    """Plan files, headers, parts, transfers and every rank's writes for one checkpoint.

    ``tensors`` lists each tensor once; ``chunks`` holds every rank's chunk
    (after DCP's dedup of replicated items), as :class:`ChunkSpec` objects or
    a :func:`chunk_table`. ``min_part``/``max_part`` are the storage's rules
    for one writer's contiguous byte run (see :func:`plan_parts`);
    ``transfer_budget`` bounds the bytes one rank sends or receives per round.
    Raises :class:`LayoutError` if two tensors share a name within a group, a
    chunk names an unknown tensor, or a tensor's chunks do not tile it exactly
    (``tiling_checked=True``: the caller already proved that with
    :func:`check_tiling`, as our planner's global step does).

    Near-linear in the number of chunks: the work per tensor and per file is
    numpy over all its chunks at once, and each rank's plan holds only its
    own tensors' places and parts.
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
    table = dict(chunks) if isinstance(chunks, Mapping) else chunk_table(chunks)
    for key, arrays in table.items():
        if key not in by_key:
            raise LayoutError(f"{_describe(arrays.specs(key)[0])} names tensor {key!r}, which no plan declares")
    if not tiling_checked:
        for spec in tensors:
            check_tiling(spec, table.get(spec.key))

    groups: dict[str, list[TensorSpec]] = defaultdict(list)
    for spec in tensors:
        groups[spec.group].append(spec)
    files: list[FileLayout] = []
    for group in sorted(groups):
        assigned = _assign_files(groups[group], max_bytes)
        for fname, members in zip(file_names(group, len(assigned)), assigned, strict=False):
            files.append(_build_file(fname, group, members, metadata))

    placement: dict[str, TensorPlacement] = {}
    key_of = {(s.group, s.name): s.key for s in tensors}
    for f in files:
        for e in f.entries:
            placement[key_of[f.group, e.name]] = TensorPlacement(f.name, f.data_start + e.begin, e.shape, DTYPE_ITEMSIZE[e.dtype])
    tensors_of: dict[int, dict[str, TensorPlacement]] = defaultdict(dict)
    for key, arrays in table.items():
        live = arrays.sizes.prod(axis=1) > 0
        for rank in np.unique(arrays.ranks[live]).tolist():
            tensors_of[rank][key] = placement[key]

    headers: dict[int, list[HeaderWrite]] = defaultdict(list)
    part_rows: list[np.ndarray] = []  # (rank, file index, number, start, end)
    transfers: list[Transfer] = []
    for index, f in enumerate(files):
        starts, ends, ranks = _file_runs(f, [(placement[key_of[f.group, e.name]], table.get(key_of[f.group, e.name])) for e in f.entries])
        # The header goes with the file's first data byte, so a file's first part needs no transfer.
        header_rank = int(ranks[0]) if len(ranks) else 0
        headers[header_rank].append(HeaderWrite(f.name, f.header))
        starts = np.concatenate([[0], starts])
        ends = np.concatenate([[f.data_start], ends])
        ranks = np.concatenate([[header_rank], ranks])
        cut, moved = _cut_parts(f.name, f.size, starts, ends, ranks, min_part=min_part, max_part=max_part)
        part_rows.append(np.column_stack([cut[:, 2], np.full(len(cut), index), np.arange(1, len(cut) + 1), cut[:, 0], cut[:, 1]]))
        transfers.extend(moved)
    rounds = plan_rounds(transfers, transfer_budget)
    all_parts = np.concatenate(part_rows) if part_rows else np.zeros((0, 5), dtype=np.int64)
    all_parts = all_parts[np.lexsort((all_parts[:, 2], all_parts[:, 1], all_parts[:, 0]))]
    writers = sorted(set(tensors_of) | set(headers) | set(all_parts[:, 0].tolist()) | set(range(world_size or 0)))
    sends: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for number, rnd in enumerate(rounds):
        for t in rnd:
            sends[number, t.src].append(t)
            recvs[number, t.dst].append(t)
    bounds = np.searchsorted(all_parts[:, 0], [*writers, (writers[-1] if writers else 0) + 1])
    plans = {}
    for i, r in enumerate(writers):
        mine = all_parts[bounds[i] : bounds[i + 1]]
        file_cuts = np.flatnonzero(np.diff(mine[:, 1])) + 1
        per_file = np.split(mine, file_cuts) if len(mine) else []
        table_r = PartTable(
            r,
            tuple(files[int(rows[0, 1])].name for rows in per_file),
            tuple(np.ascontiguousarray(rows[:, 2:5]) for rows in per_file),
        )
        plans[r] = RankWritePlan(
            r,
            tensors_of.get(r, {}),
            tuple(headers.get(r, ())),
            table_r,
            tuple(TransferRound(tuple(sends.get((n, r), ())), tuple(recvs.get((n, r), ()))) for n in range(len(rounds))),
        )
    return CheckpointLayout(tuple(files), tuple(tensors), plans, table)


def _file_runs(
    f: FileLayout, members: Sequence[tuple[TensorPlacement, ChunkArrays | None]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, ends, ranks)`` of every byte run of the file's data, sorted: who holds which bytes."""
    starts, lengths, ranks = [], [], []
    for place, arrays in members:
        if arrays is None:
            continue
        s, n, r = _run_arrays(place, arrays)
        starts.append(s)
        lengths.append(n)
        ranks.append(r)
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    start = np.concatenate(starts)
    order = np.argsort(start, kind="stable")
    start = start[order]
    return start, start + np.concatenate(lengths)[order], np.concatenate(ranks)[order]


def _run_arrays(place: TensorPlacement, arrays: ChunkArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every run of a tensor's non-empty chunks as ``(starts, lengths, ranks)`` arrays.

    A chunk whose dims before the last partial one are all 1 (``Shard(0)``,
    or a row of anything) is one run, computed for all such chunks at once;
    other chunks (column shards) go through :func:`chunk_runs`.
    """
    shape = np.asarray(place.shape, dtype=np.int64)
    live = arrays.sizes.prod(axis=1) > 0
    offsets, sizes, owners = arrays.offsets[live], arrays.sizes[live], arrays.ranks[live]
    if not len(place.shape):
        return np.full(len(owners), place.start, dtype=np.int64), np.full(len(owners), place.itemsize, dtype=np.int64), owners
    strides = np.asarray(_row_major_strides(place.shape), dtype=np.int64) * place.itemsize
    partial = sizes != shape
    ndim = len(place.shape)
    # The last dim a chunk does not span (-1: the whole tensor).
    split = np.where(partial.any(axis=1), ndim - 1 - np.argmax(partial[:, ::-1], axis=1), -1)
    outer_ones = np.logical_and.accumulate(np.concatenate([np.ones((len(sizes), 1), dtype=bool), sizes == 1], axis=1), axis=1)
    single = outer_ones[np.arange(len(sizes)), np.maximum(split, 0)] | (split <= 0)
    starts = place.start + offsets @ strides
    lengths = np.where(split >= 0, sizes[np.arange(len(sizes)), np.maximum(split, 0)] * strides[np.maximum(split, 0)], shape[0] * strides[0])
    if single.all():
        return starts, lengths, owners
    s_out, n_out, r_out = [starts[single]], [lengths[single]], [owners[single]]
    for i in np.flatnonzero(~single).tolist():
        runs = place.runs(offsets[i].tolist(), sizes[i].tolist())
        at = runs.offsets()
        s_out.append(at)
        n_out.append(np.full(len(at), runs.length, dtype=np.int64))
        r_out.append(np.full(len(at), owners[i], dtype=np.int64))
    return np.concatenate(s_out), np.concatenate(n_out), np.concatenate(r_out)


def restamp(layout: CheckpointLayout, metadata: Mapping[str, str]) -> CheckpointLayout:
    """``layout`` with every header re-encoded for new ``__metadata__`` (a new snapshot id).

    Offsets stay valid only if no header changes length: raises
    :class:`LayoutError` otherwise (plan the layout again).

    Example:
        >>> layout = plan_layout([TensorSpec("w", "w", "F32", (2,))], [ChunkSpec(0, "w", (0,), (2,))],
        ...                      max_shard_size=100, metadata={"snapshot": "a"})
        >>> restamp(layout, {"snapshot": "b"}).rank_plans[0].headers[0].data[8:].strip()
        b'{"__metadata__":{"snapshot":"b"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    """
    files = []
    for f in layout.files:
        header = encode_header(f.entries, metadata)
        if len(header) != len(f.header):
            raise LayoutError(f"{f.name}: the new metadata changes the header's length; plan the layout again")
        files.append(dataclasses.replace(f, header=header))
    headers = {f.name: f.header for f in files}
    plans = {
        r: dataclasses.replace(p, headers=tuple(HeaderWrite(h.file, headers[h.file]) for h in p.headers))
        for r, p in layout.rank_plans.items()
    }
    return dataclasses.replace(layout, files=tuple(files), rank_plans=plans)


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
    a = np.asarray(owned, dtype=np.int64).reshape(-1, 3)
    cut, _ = _cut_parts(file, size, a[:, 0], a[:, 1], a[:, 2], min_part=min_part, max_part=max_part, max_parts=max_parts)
    return [PartPlan(file, n, s, e, r) for n, (s, e, r) in enumerate(cut.tolist(), 1)]


def _cut_parts(
    file: str,
    size: int,
    starts: np.ndarray,
    ends: np.ndarray,
    ranks: np.ndarray,
    *,
    min_part: int,
    max_part: int | None,
    max_parts: int = MAX_PARTS,
) -> tuple[np.ndarray, list[Transfer]]:
    """:func:`plan_parts` on arrays: ``(start, end, rank)`` rows of the parts, and the transfers they need."""
    if min_part < 1:
        raise ConfigurationError(f"min_part must be >= 1, got {min_part}")
    limit = max(max_part or size, min_part, -(-size // max_parts))
    # A holder's maximal contiguous range is one span.
    new = np.ones(len(ranks), dtype=bool)
    new[1:] = ranks[1:] != ranks[:-1]
    first = np.flatnonzero(new)
    span_start, span_rank = starts[first], ranks[first]
    span_end = np.append(starts[first[1:]], size) if len(first) else np.zeros(0, dtype=np.int64)
    length = span_end - span_start
    if (length >= min_part).all():
        # Every span can be its own parts: cut each into equal pieces in [min_part, limit].
        pieces = np.minimum(-(-length // limit), length // min_part)
        which = np.repeat(np.arange(len(length)), pieces)
        j = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        lo = span_start[which] + (j * length[which]) // pieces[which]
        hi = span_start[which] + ((j + 1) * length[which]) // pieces[which]
        return np.column_stack([lo, hi, span_rank[which]]), []
    spans = [list(x) for x in zip(span_start.tolist(), span_end.tolist(), span_rank.tolist(), strict=True)]
    cuts: list[tuple[int, int]] = []
    pos, i = 0, 0
    while pos < size:
        while spans[i][1] <= pos:
            i += 1
        remaining = spans[i][1] - pos
        if remaining >= min_part:
            # The rest of the span in equal pieces of at most ``limit``, but never below
            # min_part (S3 enforces that one: pieces may then be a little over ``limit``).
            pieces_n = min(-(-remaining // limit), remaining // min_part)
            cuts.extend((pos + j * remaining // pieces_n, pos + (j + 1) * remaining // pieces_n) for j in range(pieces_n))
            pos = spans[i][1]
            continue
        if pos + min_part >= size:
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
    rows = []
    transfers: list[Transfer] = []
    owned = list(zip(starts.tolist(), ends.tolist(), ranks.tolist(), strict=True))
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
        rows.append((start, end, rank))
        transfers.extend(_foreign_bytes(PartPlan(file, number, start, end, rank), owned))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3), transfers


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
