"""Save/load throughput and rank-0 peak memory of a 2-rank FSDP2 state, ours next to torch's writers.

Each method runs in fresh processes (so peak RSS is its own): build an FSDP2
state of ``--gib`` GiB fp32, save it, evict the page cache of the written
files (fsync + POSIX_FADV_DONTNEED), load it into a fresh sharded state, and
check every byte. Prints a markdown table and writes JSON.

    python benchmarks/save_load.py --gib 1 --out bench_out/save_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from dcp_safetensors import SafetensorsReader, SafetensorsWriter

METHODS = ["dcp_safetensors", "torch_distcp", "torch_hf_consolidated"]


def writer_reader(method: str, path: str):
    if method == "dcp_safetensors":
        return SafetensorsWriter(path), SafetensorsReader(path)
    if method == "torch_distcp":
        return dcp.FileSystemWriter(path), dcp.FileSystemReader(path)
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    return (
        HuggingFaceStorageWriter(path, save_distributed=True, enable_consolidation=True),
        HuggingFaceStorageReader(path),
    )


class PeakRSS:
    """Samples this process's RSS every 5 ms between start() and stop()."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def evict(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def build(gib: float, seed: int, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers = max(1, round(gib * 2**30 / (4096 * 4096 * 4)))
    model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rank_main(rank: int, world: int, port: int, method: str, gib: float, path: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sd = get_model_state_dict(build(gib, 0, mesh))
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    writer, reader = writer_reader(method, path)
    dist.barrier()
    with PeakRSS() as save_mem:
        start = time.perf_counter()
        dcp.save(sd, storage_writer=writer)
        dist.barrier()
        save_s = time.perf_counter() - start
    if rank == 0:
        evict(path)
    target = get_model_state_dict(build(gib, 1, mesh))
    dist.barrier()
    with PeakRSS() as load_mem:
        start = time.perf_counter()
        dcp.load(target, storage_reader=reader)
        dist.barrier()
        load_s = time.perf_counter() - start
    ok = all(torch.equal(sd[k].to_local(), target[k].to_local()) for k in sd)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    if rank == 0:
        out.update(
            method=method,
            state_bytes=nbytes,
            bytes_on_disk=written,
            save_s=save_s,
            load_s=load_s,
            save_MBps=nbytes / 1e6 / save_s,
            load_MBps=nbytes / 1e6 / load_s,
            rank0_save_extra_MiB=(save_mem.peak - save_mem.base) / 2**20,
            rank0_load_extra_MiB=(load_mem.peak - load_mem.base) / 2**20,
            correct=ok,
        )
    dist.destroy_process_group()


def run(method: str, gib: float, root: str) -> dict:
    path = tempfile.mkdtemp(dir=root, prefix=method + "-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(rank_main, args=(2, port, method, gib, path, out), nprocs=2, join=True)
    shutil.rmtree(path)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", default="bench_out/save_load.json")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="dcp-bench-")
    results = [run(m, args.gib, root) for m in args.methods]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    ours = results[0]
    print("| method | save MB/s | load MB/s | save vs ours | rank-0 extra RSS save / load (MiB) | on disk (MB) | correct |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['save_MBps']:.0f} | {r['load_MBps']:.0f} | {ours['save_s'] / r['save_s']:.2f}x | "
            f"{r['rank0_save_extra_MiB']:.0f} / {r['rank0_load_extra_MiB']:.0f} | {r['bytes_on_disk'] / 1e6:.0f} | {r['correct']} |"
        )


if __name__ == "__main__":
    main()
