"""The floor of many processes writing shared files: separate files vs one shared file vs a file per process.

Four processes write 134 MiB each (fsync included), as ``.distcp`` does (a file
each) and as an HF checkpoint written by every rank needs: one file for all
(contiguous ranges, 8 KiB rows interleaved as a column shard, the same rows
through ``mmap``), or as many files as processes, each process holding a
quarter of every file (FSDP) and writing them in the same order or each
starting at another file (what ``SafetensorsWriter`` does). Linux serialises
buffered writes to one file, which is what shared files pay for when every
process writes the same one. docs/benchmarks.md ("2-D and 3-D layouts")
quotes the results.

Usage::

    python benchmarks/shared_file.py /dev/shm/floor /tmp/floor
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import sys
import time

import numpy as np

RANKS = 4
PER_RANK = 134 << 20
ROW = 8192
MODES = ("separate files", "shared, contiguous", "shared, rows interleaved", "shared, rows via mmap",
         "a file per rank, same order", "a file per rank, rotated")


def _write(root: str, rank: int, mode: str, barrier, results) -> None:
    src = np.random.default_rng(rank).integers(0, 256, PER_RANK, dtype=np.uint8)
    view = memoryview(src)
    path = os.path.join(root, f"rank{rank}" if mode == MODES[0] else "shared")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    shared = [os.open(os.path.join(root, f"file{i}"), os.O_RDWR | os.O_CREAT, 0o644) for i in range(RANKS)]
    barrier.wait()
    started = time.perf_counter()
    if mode in MODES[4:]:
        quarter = PER_RANK // RANKS  # this rank's rows of each file's tensors
        start = rank if mode == MODES[5] else 0
        for i in [(start + k) % RANKS for k in range(RANKS)]:
            for offset in range(0, quarter, 16 << 20):
                size = min(16 << 20, quarter - offset)
                os.pwrite(shared[i], view[i * quarter + offset :][:size], rank * quarter + offset)
        for f in shared:
            os.fsync(f)
    elif mode == MODES[3]:
        with mmap.mmap(fd, RANKS * PER_RANK) as mapped:
            rows = PER_RANK // ROW
            np.frombuffer(mapped, dtype=np.uint8).reshape(rows, RANKS, ROW)[:, rank, :] = src.reshape(rows, ROW)
            mapped.flush()
    elif mode == MODES[2]:
        for i in range(PER_RANK // ROW):
            os.pwrite(fd, view[i * ROW : (i + 1) * ROW], (i * RANKS + rank) * ROW)
    else:
        base = rank * PER_RANK if mode == MODES[1] else 0
        for offset in range(0, PER_RANK, 64 << 20):
            os.pwrite(fd, view[offset : offset + (64 << 20)], base + offset)
    os.fsync(fd)
    for f in (fd, *shared):
        os.close(f)
    results.put(time.perf_counter() - started)


def main(roots: list[str]) -> None:
    ctx = mp.get_context("fork")
    for root in roots:
        os.makedirs(root, exist_ok=True)
        for mode in MODES:
            times = []
            for _ in range(3):
                for name in os.listdir(root):
                    os.unlink(os.path.join(root, name))
                if mode == MODES[3]:  # a mapping needs the file at its full size first
                    with open(os.path.join(root, "shared"), "wb") as f:
                        f.truncate(RANKS * PER_RANK)
                barrier, results = ctx.Barrier(RANKS), ctx.Queue()
                procs = [ctx.Process(target=_write, args=(root, r, mode, barrier, results)) for r in range(RANKS)]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
                times.append(max(results.get() for _ in range(RANKS)))
            print(f"{root}: {mode:26s} min {min(times):.3f} s, max {max(times):.3f} s", flush=True)
        for name in os.listdir(root):
            os.unlink(os.path.join(root, name))


if __name__ == "__main__":
    main(sys.argv[1:] or ["/dev/shm/shared_file_floor"])
