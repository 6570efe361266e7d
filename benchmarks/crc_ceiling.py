"""The most a checked load can keep of an unchecked one's speed when reads are memory copies (tmpfs, page cache).

A read from the page cache is a copy on the reading core; checking adds one
CRC-32 pass (ISA-L, as ``dcp_safetensors.checksum``) over the same bytes on
the same core, so a checked load runs at most at ``t_copy / (t_copy + t_crc)``
of an unchecked one. Each process (one per core a rank would use) times, min
of ``--repeats``: ``pread`` of ``--mib`` MiB from a file in ``--dir`` into a
buffer; the CRC-32 of that buffer in 1 MiB blocks; both in a row.

    .venv/bin/python benchmarks/crc_ceiling.py [--mib 512] [--procs 1 2] [--dir /dev/shm]

Example output (2026-12-02, the 2-core VM)::

    1 process(es): copy 115 ms (4.7 GB/s), crc 32 ms (16.8 GB/s), copy+crc 146 ms: ceiling 0.79x
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import time

import numpy as np

from dcp_safetensors.checksum import crc32

BLOCK = 1 << 20


def _measure(path: str, nbytes: int, repeats: int, start: multiprocessing.synchronize.Barrier) -> tuple[float, float, float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = memoryview(np.empty(nbytes, np.uint8))

        def copy() -> None:
            os.preadv(fd, [buffer], 0)

        def check() -> None:
            for offset in range(0, nbytes, BLOCK):
                crc32(buffer[offset : offset + BLOCK])

        def both() -> None:
            copy()
            check()

        start.wait()
        best = {}
        for name, fn in [("copy", copy), ("crc", check), ("both", both)] * 2:  # twice: the first round warms up
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
            best[name] = min(times)
        return best["copy"], best["crc"], best["both"]
    finally:
        os.close(fd)


def _worker(path: str, nbytes: int, repeats: int, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    out.put(_measure(path, nbytes, repeats, start))


def ceiling(directory: str, mib: int, procs: int, repeats: int) -> list[tuple[float, float, float]]:
    """``(copy, crc, copy+crc)`` seconds of each of ``procs`` processes running at once."""
    nbytes = mib << 20
    paths = [os.path.join(directory, f"crc-ceiling-{i}.bin") for i in range(procs)]
    for path in paths:
        with open(path, "wb") as f:
            f.write(os.urandom(nbytes))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(p, nbytes, repeats, start, out)) for p in paths]
    try:
        for w in workers:
            w.start()
        return [out.get(timeout=600) for _ in workers]
    finally:
        for w in workers:
            w.join()
        for path in paths:
            os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for procs in args.procs:
        for copy, crc, both in ceiling(args.dir, args.mib, procs, args.repeats):
            nbytes = args.mib << 20
            print(f"{procs} process(es): copy {copy * 1e3:.0f} ms ({nbytes / copy / 1e9:.1f} GB/s), crc {crc * 1e3:.0f} ms "
                  f"({nbytes / crc / 1e9:.1f} GB/s), copy+crc {both * 1e3:.0f} ms: ceiling {copy / both:.2f}x")


if __name__ == "__main__":
    main()
