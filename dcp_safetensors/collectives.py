"""Moving bytes between ranks, and agreeing on errors before every collective.

Rules every function here keeps: each rank calls the same collectives the
same number of times (a rank with nothing to send still takes part), and a
rank that failed locally says so in the status exchange that precedes the
next data collective, so every rank raises the same error instead of one
rank leaving and the others hanging.

Example (one process, no group):
    >>> src = ByteSource()
    >>> src.add("f", 0, memoryview(b"abcd")); src.add("f", 4, memoryview(b"efgh"))
    >>> b"".join(src.read("f", 2, 4))
    b'cdef'
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dcp_safetensors.errors import LayoutError, RankFailedError
from dcp_safetensors.layout import RowSlab, TransferRound

__all__ = ["ByteSource", "agree_on_errors", "transfer", "pack_round", "exchange", "exchange_rows", "broadcast_bytes"]

BROADCAST_CHUNK = 256 << 20
"""Bytes per broadcast call: bounds the staging copies a backend makes."""


class ByteSource:
    """The file bytes one rank holds: views into its tensors, headers and received buffers."""

    def __init__(self) -> None:
        self._pieces: dict[str, list[tuple[int, memoryview]]] = defaultdict(list)
        self._sorted: set[str] = set()
        # Parts of one file are read from several write threads; CPython's list.sort shows
        # the list empty while it sorts, so a read racing the first sort found no bytes.
        self._sorting = threading.Lock()

    def add(self, file: str, offset: int, view: memoryview) -> None:
        if view.nbytes:
            self._pieces[file].append((offset, view))
            self._sorted.discard(file)

    def read(self, file: str, offset: int, length: int) -> list[memoryview]:
        """Views covering ``[offset, offset + length)`` of ``file`` exactly; LayoutError if not held."""
        with self._sorting:
            pieces = self._pieces[file]
            if file not in self._sorted:
                pieces.sort(key=lambda p: p[0])
                self._sorted.add(file)
        out: list[memoryview] = []
        pos, end = offset, offset + length
        i = max(bisect.bisect_right(pieces, pos, key=lambda p: p[0]) - 1, 0)
        while pos < end and i < len(pieces):
            start, view = pieces[i]
            if start > pos:
                break
            if start + view.nbytes > pos:
                take = min(end, start + view.nbytes) - pos
                out.append(view[pos - start : pos - start + take])
                pos += take
            i += 1
        if pos < end:
            raise LayoutError(f"{file}: this rank does not hold bytes [{pos}, {end}) it was planned to write or send")
        return out


def agree_on_errors(error: BaseException | None, group: dist.ProcessGroup | None, phase: str) -> None:
    """All ranks learn whether any failed; every rank raises if one did (the failing one its own error)."""
    summary = None if error is None else f"{type(error).__name__}: {error}"
    summaries: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(summaries, summary, group=group)
    failed = {r: s for r, s in enumerate(summaries) if s is not None}
    if error is not None:
        raise error
    if failed:
        rank = min(failed)
        raise RankFailedError(f"rank {rank} failed before {phase}: {failed[rank]}")


def transfer(
    rounds: Sequence[TransferRound], source: ByteSource, group: dist.ProcessGroup | None, error: BaseException | None
) -> None:
    """Run every transfer round of a save: what each rank sends, packed, then one ``all_to_all_single``.

    ``error`` is this rank's failure so far (None if none): every round first agrees on
    errors, the packing's included, so all ranks raise together and none is left
    waiting in the collective (:class:`~dcp_safetensors.errors.RankFailedError` on the others).
    """
    device = collective_device(group)
    for number, rnd in enumerate(rounds):
        payload = bytearray()
        if error is None:
            try:
                payload = pack_round(rnd, source)
            except Exception as e:  # noqa: BLE001 - whatever it is, every rank must learn of it
                error = e
        agree_on_errors(error, group, f"transfer round {number + 1}")
        exchange(rnd, payload, source, group, device)


def pack_round(rnd: TransferRound, source: ByteSource) -> bytearray:
    """The bytes this rank sends in round ``rnd``, packed by destination in plan order.

    Kept apart from :func:`exchange` so that a failure here (a missing byte range, no
    memory) is agreed on before the collective: a rank that raised inside it would
    leave the others waiting in ``all_to_all_single`` until the process group's timeout.
    """
    payload = bytearray(sum(t.length for t in rnd.sends))
    pos = 0
    for t in sorted(rnd.sends, key=lambda t: t.dst):
        for view in source.read(t.file, t.offset, t.length):
            payload[pos : pos + view.nbytes] = view
            pos += view.nbytes
    return payload


def exchange(
    rnd: TransferRound, payload: bytearray, source: ByteSource, group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Run one round: send ``payload`` (:func:`pack_round`'s), add what arrives to ``source``."""
    world = dist.get_world_size(group)
    send_sizes = [0] * world
    recv_sizes = [0] * world
    # Plan ranks are ranks within the group DCP gathered the plans on: the same group as here.
    for t in rnd.sends:
        send_sizes[t.dst] += t.length
    for t in rnd.recvs:
        recv_sizes[t.src] += t.length
    send = torch.frombuffer(payload, dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send.to(device), recv_sizes, send_sizes, group=group)
    received = recv.cpu().numpy()
    pos = 0
    for t in sorted(rnd.recvs, key=lambda t: t.src):
        source.add(t.file, t.offset, memoryview(received[pos : pos + t.length]))  # type: ignore[arg-type]
        pos += t.length


def exchange_rows(
    slabs: Sequence[RowSlab],
    rank: int,
    chunks: Mapping[tuple[str, tuple[int, ...]], np.ndarray],
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> list[tuple[str, int, np.ndarray]]:
    """Run one round of the row exchange: ``(file, offset, bytes)`` of each row block this rank then writes.

    ``slabs`` are the round's slabs this rank is a member of, in plan order
    (every member lists a slab at the same place, so the pieces one rank
    sends another line up with what that rank expects); ``chunks`` holds
    this rank's chunk bytes by ``(key, offsets)``. One ``all_to_all_single``
    per round, every rank of the group taking part.
    """
    world = dist.get_world_size(group)
    sends: list[list[np.ndarray]] = [[] for _ in range(world)]
    recv_sizes = [0] * world
    mine = []
    for slab in slabs:
        member = slab.ranks.index(rank)
        chunk = chunks[slab.key, slab.offsets[member]]
        for dst, piece in slab.sends(member, chunk).items():
            sends[dst].append(piece)
        a, b = slab.blocks()[member]
        for i, src in enumerate(slab.ranks):
            if i != member:
                recv_sizes[src] += (b - a) * slab.widths[i]
        mine.append((slab, member, chunk))
    send_sizes = [sum(p.size for p in pieces) for pieces in sends]
    flat = [p for pieces in sends for p in pieces]
    payload = np.concatenate(flat) if flat else np.empty(0, dtype=np.uint8)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, torch.from_numpy(payload).to(device), recv_sizes, send_sizes, group=group)
    received = recv.cpu().numpy()
    at = np.concatenate([[0], np.cumsum(recv_sizes)]).tolist()
    out = []
    for slab, member, chunk in mine:
        a, b = slab.blocks()[member]
        got = {}
        for i, src in enumerate(slab.ranks):
            if i != member:
                n = (b - a) * slab.widths[i]
                got[src] = received[at[src] : at[src] + n]
                at[src] += n
        if b > a:  # a slab of fewer rows than members leaves some without a block
            offset, block = slab.block(member, chunk, got)
            out.append((slab.file, offset, block))
    return out


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's buffers must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(buffer: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Broadcast a uint8 CPU buffer from group rank 0 in fixed chunks (the same calls on every rank)."""
    device = collective_device(group)
    for start in range(0, buffer.numel(), BROADCAST_CHUNK):
        piece = buffer[start : start + BROADCAST_CHUNK]
        staged = piece.to(device)  # a no-op on CPU
        dist.broadcast(staged, group=group, group_src=0)
        if staged is not piece:
            piece.copy_(staged)
