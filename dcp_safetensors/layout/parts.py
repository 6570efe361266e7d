"""How a file is cut into parts, who writes each, and the transfers that bring them their bytes.

Owns the step after the byte layout: given who holds which bytes of a file
(``(start, end, rank)`` ranges tiling it), :func:`cut_parts` cuts it into
parts that obey the storage's size rules (S3: at least 5 MiB but the last),
each written by the rank holding most of its bytes; the bytes a writer lacks
become :class:`Transfer` objects, which :func:`plan_rounds` packs into
``all_to_all`` rounds under a per-rank byte budget. :class:`PartTable` is one
rank's parts, columnar. Pure: plain ints and numpy, no file or tensor.

Example:
    >>> cut_parts("f", 10, np.array([0, 6]), np.array([6, 10]), np.array([0, 1]), min_part=1, max_part=None)[0].tolist()
    [[0, 6, 0], [6, 10, 1]]
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dcp_safetensors.errors import ConfigurationError

__all__ = [
    "MAX_PARTS",
    "PartPlan",
    "PartTable",
    "Transfer",
    "TransferRound",
    "plan_rounds",
    "cut_parts",
]


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


MAX_PARTS = 10_000


def cut_parts(
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
    """Cut a file into parts, each at least ``min_part`` bytes (but the last) and at most ``max_part``.

    ``starts``, ``ends``, ``ranks`` list the ranges tiling ``[0, size)`` in
    order, and who holds each. Parts follow ownership boundaries where the
    rules allow, so large shards are written by their holder with nothing
    moved; each part goes to the rank holding most of its bytes. With
    ``min_part = 1`` and no ``max_part`` (POSIX), every part is one holder's
    maximal contiguous range. Returns the parts' ``(start, end, rank)`` rows
    (part ``i + 1`` is row ``i``) and the transfers they need.

    Example:
        >>> rows, moved = cut_parts("f", 12, np.array([0, 3]), np.array([3, 12]), np.array([0, 1]), min_part=4, max_part=8)
        >>> rows.tolist(), moved
        ([[0, 4, 0], [4, 12, 1]], [Transfer(src=1, dst=0, file='f', offset=3, length=1)])
    """
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
    cuts = _cut_spans(spans, size, min_part=min_part, limit=limit)
    owned = list(zip(starts.tolist(), ends.tolist(), ranks.tolist(), strict=True))
    rows = []
    transfers: list[Transfer] = []
    i = 0
    for number, (start, end) in enumerate(cuts, 1):
        while spans[i][1] <= start:
            i += 1
        held = _held(spans, i, start, end)
        rank = max(sorted(held), key=lambda r: held[r])
        rows.append((start, end, rank))
        transfers.extend(_foreign_bytes(PartPlan(file, number, start, end, rank), owned))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3), transfers


def _cut_spans(spans: Sequence[Sequence[int]], size: int, *, min_part: int, limit: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every part of a file whose holders' ``spans`` are not all ``min_part`` long."""
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
        end = _short_part_end(spans, i, pos, size, min_part=min_part, limit=limit)
        cuts.append((pos, end))
        pos = end
    return cuts


def _short_part_end(
    spans: Sequence[Sequence[int]], i: int, pos: int, size: int, *, min_part: int, limit: int
) -> int:
    """The end of the part starting at ``pos``, where its holder (``spans[i]``) has under ``min_part`` bytes left."""
    if pos + min_part >= size:
        return size
    # The part must reach into later holders' bytes: end it either exactly at
    # min_part or at the next holder boundary, whichever moves fewer bytes.
    j = i
    while spans[j][1] < pos + min_part:
        j += 1
    end = pos + min_part
    if spans[j][1] - pos <= limit and _foreign(spans, i, pos, spans[j][1]) <= _foreign(spans, i, pos, end):
        end = spans[j][1]
    return end


def _held(spans: Sequence[Sequence[int]], i: int, start: int, end: int) -> dict[int, int]:
    """``{rank: bytes of [start, end) it holds}``; ``spans[i]`` is the first span ending after ``start``."""
    held: dict[int, int] = defaultdict(int)
    while i < len(spans) and spans[i][0] < end:
        held[spans[i][2]] += min(end, spans[i][1]) - max(start, spans[i][0])
        i += 1
    return held


def _foreign(spans: Sequence[Sequence[int]], i: int, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` not held by its main holder (``spans[i]`` contains ``start``)."""
    return (end - start) - max(_held(spans, i, start, end).values())


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
