"""The whole checkpoint's plan: every rank's writes, from every rank's chunks, decided once.

Owns :func:`plan_layout`, which ties the other modules together: files and
headers (:mod:`.files`), the tiling proof (:mod:`.tiling`), the byte runs each
chunk fills (:mod:`.geometry`), parts and transfer rounds (:mod:`.parts`).
Its result, :class:`CheckpointLayout`, is the frozen snapshot: headers, the
index and every rank's writes all derive from it. Each rank receives only its
:class:`RankWritePlan`: where the tensors it holds sit
(:class:`~.geometry.TensorLocation`), the headers it writes and its parts; it turns its
chunks into byte runs itself (:meth:`RankWritePlan.chunk_write`).
:func:`with_header_metadata` re-encodes the headers for a new snapshot id.

Example:
    >>> layout = plan_layout([TensorSpec("w", "w", "F32", (4,))], [ChunkSpec(0, "w", (0,), (4,))],
    ...                      max_shard_size="1GB", metadata={})
    >>> len(layout.files[0].header), layout.rank_plans[0].chunk_write("w", (0,), (4,)).extents
    (88, Extents(start=88, length=16, counts=(), strides=()))
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dcp_safetensors.errors import ConfigurationError, LayoutError
from dcp_safetensors.format import DTYPE_ITEMSIZE, encode_header
from dcp_safetensors.layout.files import FileLayout, parse_size, plan_files
from dcp_safetensors.layout.geometry import (
    MODEL_GROUP,
    ChunkArrays,
    ChunkSpec,
    Extents,
    TensorLocation,
    TensorSpec,
    chunk_extent_arrays,
    chunk_table,
    describe,
)
from dcp_safetensors.layout.parts import (
    PartPlan,
    PartTable,
    Transfer,
    TransferRound,
    cut_parts,
    plan_rounds,
)
from dcp_safetensors.layout.row_blocks import SMALL_RUN, RowSlab, plan_row_rounds, plan_row_slabs
from dcp_safetensors.layout.tiling import check_tiling

__all__ = [
    "whole_row_bands",
    "ChunkWrite",
    "HeaderWrite",
    "RankWritePlan",
    "CheckpointLayout",
    "plan_layout",
    "with_header_metadata",
]


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk a rank writes: the DCP item it comes from and the extents it fills in ``file``."""

    key: str
    offsets: tuple[int, ...]
    file: str
    extents: Extents


@dataclass(frozen=True)
class HeaderWrite:
    """The header bytes a rank writes at offset 0 of ``file``."""

    file: str
    data: bytes


@dataclass(frozen=True, eq=False)
class RankWritePlan:
    """Everything one rank does in ``write_data``; travels in its ``SavePlan.storage_data``.

    Only what this rank needs, so its size follows the rank's own chunks, not
    the world size: where each tensor it holds sits (``tensors``; the rank
    turns its chunks into byte runs itself, :meth:`chunk_write`), the
    ``headers`` it writes, its ``parts`` and the transfer ``rounds`` that
    bring other ranks' bytes of those parts (every rank runs the same number
    of rounds). An ``in_place`` plan has neither parts nor rounds: the rank
    writes its headers and chunks where they lie, and ``file_sizes`` holds
    the size of each file it writes to (for its share of the file's CRC), in
    the order it writes them (each rank starts at another file);
    its short-run column chunks are exchanged in ``row_rounds`` instead (the
    slabs it takes part in, per round; every rank runs every round) and
    written as row blocks (:mod:`.row_blocks`).
    """

    def row_chunks(self) -> set[tuple[str, tuple[int, ...]]]:
        """``(key, offsets)`` of this rank's chunks that go through the row exchange, not in place."""
        return {(s.key, s.offsets[s.ranks.index(self.rank)]) for rnd in self.row_rounds for s in rnd}

    rank: int = 0
    tensors: Mapping[str, TensorLocation] = field(default_factory=dict)
    headers: tuple[HeaderWrite, ...] = ()
    part_table: PartTable = field(default_factory=lambda: PartTable(0))
    rounds: tuple[TransferRound, ...] = ()
    in_place: bool = False
    file_sizes: Mapping[str, int] = field(default_factory=dict)
    row_rounds: tuple[tuple[RowSlab, ...], ...] = ()
    whole_bands: frozenset[str] = frozenset()
    """Keys of this rank's tensors whose block checksums run over the whole tensor, not over the rows
    of each chunk (:func:`whole_row_bands`)."""

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
        return ChunkWrite(key, tuple(offsets), placement.file, placement.extents(offsets, sizes))


@dataclass(frozen=True, eq=False)
class CheckpointLayout:
    """The frozen layout of a whole checkpoint."""

    files: tuple[FileLayout, ...]
    tensors: tuple[TensorSpec, ...]
    rank_plans: Mapping[int, RankWritePlan] = field(default_factory=dict)
    chunks: Mapping[str, ChunkArrays] = field(default_factory=dict)
    in_place_bytes: Mapping[tuple[int, str], int] = field(default_factory=dict)
    """For an ``in_place`` layout, ``{(rank, file): bytes}`` each rank must write (headers included)."""
    whole_bands: frozenset[str] = frozenset()
    """Keys whose block checksums run over the whole tensor (:func:`whole_row_bands`)."""

    @property
    def moved_bytes(self) -> int:
        """Bytes the save sends from rank to rank: part transfers (object stores) and the row exchange (POSIX)."""
        parts = sum(t.length for p in self.rank_plans.values() for rnd in p.rounds for t in rnd.sends)
        slabs = {s for p in self.rank_plans.values() for rnd in p.row_rounds for s in rnd}  # each member lists it
        return parts + sum(sent for s in slabs for _, sent, _ in s.traffic())

    def weight_map(self, group: str = MODEL_GROUP) -> dict[str, str]:
        """``{name in file: file name}`` for the tensors of ``group``."""
        return {e.name: f.name for f in self.files if f.group == group for e in f.entries}

    def total_size(self, group: str = MODEL_GROUP) -> int:
        """Sum of the tensor bytes of ``group`` (HF's ``metadata.total_size``)."""
        return sum(e.nbytes for f in self.files if f.group == group for e in f.entries)


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
    in_place: bool = False,
    small_run: int = SMALL_RUN,
    min_files: int = 1,
) -> CheckpointLayout:
    """Plan files, headers, parts, transfers and every rank's writes for one checkpoint.

    ``tensors`` lists each tensor once; ``chunks`` holds every rank's chunk
    (after DCP's dedup of replicated items), as :class:`ChunkSpec` objects or
    a :func:`chunk_table`. ``min_part``/``max_part`` are the storage's rules
    for one writer's contiguous byte run (see :func:`~.parts.cut_parts`);
    ``transfer_budget`` bounds the bytes one rank sends or receives per round.
    Raises :class:`LayoutError` if two tensors share a name within a group, a
    chunk names an unknown tensor, or a tensor's chunks do not tile it exactly
    (``tiling_checked=True``: the caller already proved that with
    :func:`check_tiling`, as our planner's global step does).

    ``in_place=True`` (storage that takes a run of any size at any offset:
    POSIX files, ``min_part`` 1) plans no parts and no transfers: each rank
    writes its own chunks' runs where they lie, so a column shard's thousands
    of row runs never become thousands of planned parts. Planning is then
    O(tensors + chunks), never O(runs), and a rank's plan holds only the
    places of its tensors; ``in_place_bytes`` is what the commit checks each
    rank's report against. Column chunks with runs under ``small_run`` bytes
    are exchanged into row blocks (:mod:`.row_blocks`; 0 turns that off),
    in rounds under ``transfer_budget``. ``min_files`` cuts each group into
    at least that many files (:func:`~.files.plan_files`).

    Near-linear in the number of chunks: the work per tensor and per file is
    numpy over all its chunks at once, and each rank's plan holds only its
    own tensors' places and parts.
    """
    max_bytes = parse_size(max_shard_size)
    _check_tensors(tensors)
    table = dict(chunks) if isinstance(chunks, Mapping) else chunk_table(chunks)
    _check_chunk_keys(tensors, table)
    if not tiling_checked:
        for spec in tensors:
            check_tiling(spec, table.get(spec.key))
    if in_place and min_part != 1:
        raise ConfigurationError(f"in-place writes need storage that takes runs of any size (min_part 1), not {min_part}")
    files = plan_files(tensors, max_bytes, metadata, min_files)
    placed = _place_tensors(files, tensors)
    tensors_of = _tensors_by_rank(table, {key: p for in_file in placed for key, p in in_file.items()})
    if in_place:
        headers, written, slabs = _plan_in_place(files, placed, table, transfer_budget, small_run)
        writers = sorted(set(tensors_of) | set(headers) | set(range(world_size or 0)))
        row_rounds = plan_row_rounds(slabs, transfer_budget)
        plans = {
            r: RankWritePlan(r, tensors_of.get(r, {}), tuple(headers.get(r, ())), PartTable(r), (), True,
                             _file_order(files, {name for (w, name) in written if w == r}, r),
                             tuple(tuple(s for s in rnd if r in s.ranks) for rnd in row_rounds))
            for r in writers
        }
    else:
        headers, parts, transfers = _plan_parts(files, placed, table, min_part=min_part, max_part=max_part)
        rounds = plan_rounds(transfers, transfer_budget)
        writers = sorted(set(tensors_of) | set(headers) | set(parts[:, 0].tolist()) | set(range(world_size or 0)))
        plans = _rank_plans(writers, files, tensors_of, headers, parts, rounds)
        written = {}
    whole = whole_row_bands(table)
    if whole:
        plans = {r: dataclasses.replace(p, whole_bands=frozenset(whole & p.tensors.keys())) for r, p in plans.items()}
    return CheckpointLayout(tuple(files), tuple(tensors), plans, table, written, whole)


def whole_row_bands(table: Mapping[str, ChunkArrays]) -> frozenset[str]:
    """Keys whose chunks' row ranges are not the cells of one cut of dim 0 (a chunk's rows hold
    another chunk's row bound): their block checksums run over the whole tensor.

    Every other tensor's blocks are cut at its chunks' row bounds, which each writer knows from its
    own chunk (:func:`~dcp_safetensors.blocks.band`); DTensor's chunks are always such cells.

    Example:
        >>> from dcp_safetensors.layout import chunk_table
        >>> sorted(whole_row_bands(chunk_table([ChunkSpec(0, "w", (0, 0), (1, 4)), ChunkSpec(1, "w", (1, 0), (3, 1)),
        ...                                     ChunkSpec(2, "w", (0, 1), (4, 3)), ChunkSpec(0, "v", (0,), (2,))])))
        ['w']
    """
    whole = []
    for key, arrays in table.items():
        live = arrays.sizes.prod(axis=1) > 0
        if not arrays.offsets.shape[1] or not live.any():
            continue
        starts = arrays.offsets[live, 0]
        ends = starts + arrays.sizes[live, 0]
        bounds = np.unique(np.concatenate([starts, ends]))
        if (np.searchsorted(bounds, ends, side="left") - np.searchsorted(bounds, starts, side="right") > 0).any():
            whole.append(key)
    return frozenset(whole)


def _check_tensors(tensors: Sequence[TensorSpec]) -> None:
    """Raise :class:`LayoutError` for a dtype safetensors lacks, a key listed twice, or two keys of one name in a group."""
    keys: set[str] = set()
    names: dict[tuple[str, str], str] = {}
    for spec in tensors:
        if spec.dtype not in DTYPE_ITEMSIZE:
            raise LayoutError(f"tensor {spec.key!r}: dtype {spec.dtype!r} has no safetensors equivalent")
        if spec.key in keys:
            raise LayoutError(f"tensor {spec.key!r} is listed twice")
        other = names.setdefault((spec.group, spec.name), spec.key)
        if other != spec.key:
            raise LayoutError(
                f"keys {other!r} and {spec.key!r} both map to {spec.name!r} in {spec.group}.safetensors"
            )
        keys.add(spec.key)


def _check_chunk_keys(tensors: Sequence[TensorSpec], table: Mapping[str, ChunkArrays]) -> None:
    """Raise :class:`LayoutError` for chunks of a tensor ``tensors`` does not list."""
    keys = {spec.key for spec in tensors}
    for key, arrays in table.items():
        if key not in keys:
            raise LayoutError(f"{describe(arrays.specs(key)[0])} names tensor {key!r}, which no plan declares")


def _place_tensors(files: Sequence[FileLayout], tensors: Sequence[TensorSpec]) -> list[dict[str, TensorLocation]]:
    """Per file, ``{key: placement}`` of its tensors, in file order."""
    key_of = {(s.group, s.name): s.key for s in tensors}
    return [
        {
            key_of[f.group, e.name]: TensorLocation(f.name, f.data_start + e.begin, e.dtype, e.shape)
            for e in f.entries
        }
        for f in files
    ]


def _tensors_by_rank(
    table: Mapping[str, ChunkArrays], placement: Mapping[str, TensorLocation]
) -> dict[int, dict[str, TensorLocation]]:
    """``{rank: {key: placement}}`` of the tensors each rank holds a non-empty chunk of."""
    tensors_of: dict[int, dict[str, TensorLocation]] = defaultdict(dict)
    for key, arrays in table.items():
        live = arrays.sizes.prod(axis=1) > 0
        for rank in np.unique(arrays.ranks[live]).tolist():
            tensors_of[rank][key] = placement[key]
    return tensors_of


def _file_order(files: Sequence[FileLayout], names: set[str], rank: int) -> dict[str, int]:
    """``{file: size}`` of the files in ``names``, in the order ``rank`` writes them: from file ``rank`` on, cyclically.

    Linux serialises buffered writes to one file (the inode lock, and the
    page cache of one mapping), so ranks that all write every file (FSDP) go
    at the speed of one writer if they write the files in the same order.
    Starting each rank at another file keeps up to ``len(files)`` writers
    apart; ``benchmarks/shared_file.py`` measures the difference.
    """
    start = rank % max(len(files), 1)  # a save of non-tensor values only has no files
    return {f.name: f.size for f in (*files[start:], *files[:start]) if f.name in names}


def _plan_in_place(
    files: Sequence[FileLayout],
    placed: Sequence[Mapping[str, TensorLocation]],
    table: Mapping[str, ChunkArrays],
    budget: int,
    small_run: int,
) -> tuple[dict[int, list[HeaderWrite]], dict[tuple[int, str], int], list[RowSlab]]:
    """Every file's header writer, the bytes each rank writes to each file, and the row slabs, from chunk boxes (no runs).

    The header goes with the rank holding the file's first data byte, as in
    :func:`_plan_parts`: the chunk of the file's first non-empty tensor that
    starts at its origin (in a row slab, that chunk's rank writes the first block).
    """
    headers: dict[int, list[HeaderWrite]] = defaultdict(list)
    written: dict[tuple[int, str], int] = defaultdict(int)
    slabs: list[RowSlab] = []
    for f, in_file in zip(files, placed, strict=True):
        header_rank = None
        for key, place in sorted(in_file.items(), key=lambda kv: kv[1].offset):
            arrays = table.get(key)
            if arrays is None:
                continue
            nbytes = arrays.sizes.prod(axis=1) * place.itemsize
            live = nbytes > 0
            if header_rank is None and live.any():
                origin = live & (arrays.offsets == 0).all(axis=1)
                header_rank = int(arrays.ranks[np.argmax(origin)])
            tensor_slabs, taken = plan_row_slabs(place, arrays, key, budget=budget, small_run=small_run)
            for slab in tensor_slabs:
                for rank, (a, b) in zip(slab.ranks, slab.blocks(), strict=True):
                    written[rank, f.name] += (b - a) * slab.row_bytes
            slabs.extend(tensor_slabs)
            live &= ~taken
            ranks, per_rank = np.unique(arrays.ranks[live], return_inverse=True)
            for rank, total in zip(ranks.tolist(), np.bincount(per_rank, weights=nbytes[live]).tolist(), strict=True):
                written[rank, f.name] += int(total)
        header_rank = 0 if header_rank is None else header_rank
        headers[header_rank].append(HeaderWrite(f.name, f.header))
        written[header_rank, f.name] += len(f.header)
    return headers, {k: n for k, n in written.items() if n}, slabs


def _plan_parts(
    files: Sequence[FileLayout],
    placed: Sequence[Mapping[str, TensorLocation]],
    table: Mapping[str, ChunkArrays],
    *,
    min_part: int,
    max_part: int | None,
) -> tuple[dict[int, list[HeaderWrite]], np.ndarray, list[Transfer]]:
    """Every file's header writer, parts and transfers.

    Returns the headers by writing rank, the parts as ``(rank, file index,
    number, start, end)`` rows sorted by rank, file and number, and the
    transfers of all files.
    """
    headers: dict[int, list[HeaderWrite]] = defaultdict(list)
    part_rows: list[np.ndarray] = []
    transfers: list[Transfer] = []
    for index, (f, in_file) in enumerate(zip(files, placed, strict=True)):
        starts, ends, ranks = _file_runs([(p, table.get(key)) for key, p in in_file.items()])
        # The header goes with the file's first data byte, so a file's first part needs no transfer.
        header_rank = int(ranks[0]) if len(ranks) else 0
        headers[header_rank].append(HeaderWrite(f.name, f.header))
        starts = np.concatenate([[0], starts])
        ends = np.concatenate([[f.data_start], ends])
        ranks = np.concatenate([[header_rank], ranks])
        cut, moved = cut_parts(f.name, f.size, starts, ends, ranks, min_part=min_part, max_part=max_part)
        part_rows.append(np.column_stack([cut[:, 2], np.full(len(cut), index), np.arange(1, len(cut) + 1), cut[:, 0], cut[:, 1]]))
        transfers.extend(moved)
    parts = np.concatenate(part_rows) if part_rows else np.zeros((0, 5), dtype=np.int64)
    return headers, parts[np.lexsort((parts[:, 2], parts[:, 1], parts[:, 0]))], transfers


def _rank_plans(
    writers: Sequence[int],
    files: Sequence[FileLayout],
    tensors_of: Mapping[int, Mapping[str, TensorLocation]],
    headers: Mapping[int, Sequence[HeaderWrite]],
    parts: np.ndarray,
    rounds: Sequence[Sequence[Transfer]],
) -> dict[int, RankWritePlan]:
    """Each writer's :class:`RankWritePlan` (``writers`` sorted; ``parts`` rows sorted by rank, as :func:`_plan_parts` gives)."""
    sends: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for number, rnd in enumerate(rounds):
        for t in rnd:
            sends[number, t.src].append(t)
            recvs[number, t.dst].append(t)
    bounds = np.searchsorted(parts[:, 0], [*writers, (writers[-1] if writers else 0) + 1])
    plans = {}
    for i, r in enumerate(writers):
        plans[r] = RankWritePlan(
            r,
            tensors_of.get(r, {}),
            tuple(headers.get(r, ())),
            _part_table(r, files, parts[bounds[i] : bounds[i + 1]]),
            tuple(TransferRound(tuple(sends.get((n, r), ())), tuple(recvs.get((n, r), ()))) for n in range(len(rounds))),
        )
    return plans


def _part_table(rank: int, files: Sequence[FileLayout], mine: np.ndarray) -> PartTable:
    """``rank``'s :class:`PartTable` from its ``(rank, file index, number, start, end)`` rows, sorted by file."""
    file_cuts = np.flatnonzero(np.diff(mine[:, 1])) + 1
    per_file = np.split(mine, file_cuts) if len(mine) else []
    return PartTable(
        rank,
        tuple(files[int(rows[0, 1])].name for rows in per_file),
        tuple(np.ascontiguousarray(rows[:, 2:5]) for rows in per_file),
    )


def _file_runs(members: Sequence[tuple[TensorLocation, ChunkArrays | None]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, ends, ranks)`` of every byte run of the file's data, sorted: who holds which bytes."""
    starts, lengths, ranks = [], [], []
    for place, arrays in members:
        if arrays is None:
            continue
        s, n, r = chunk_extent_arrays(place.shape, place.itemsize, arrays, place.offset)
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


def with_header_metadata(layout: CheckpointLayout, metadata: Mapping[str, str]) -> CheckpointLayout:
    """``layout`` with every header re-encoded for new ``__metadata__`` (a new snapshot id).

    Offsets stay valid only if no header changes length: raises
    :class:`LayoutError` otherwise (plan the layout again).

    Example:
        >>> layout = plan_layout([TensorSpec("w", "w", "F32", (2,))], [ChunkSpec(0, "w", (0,), (2,))],
        ...                      max_shard_size=100, metadata={"snapshot": "a"})
        >>> with_header_metadata(layout, {"snapshot": "b"}).rank_plans[0].headers[0].data[8:].strip()
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
