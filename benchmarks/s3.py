"""Save/load through S3 (moto on 127.0.0.1): ours next to torch's FsspecWriter/FsspecReader.

Starts moto's S3 server behind the counting proxy of the test suite, then,
for each method, saves a 2-rank FSDP2-style ``Shard(0)`` state through
``s3fs`` and loads it back (into ``Shard(1)``, so every rank reads other
ranks' bytes), and reports wall time, MB/s, requests by S3 operation, bytes
uploaded, and (ours) bytes moved between ranks to build >= 5 MiB parts.

Each method first saves and loads once untimed (to another prefix), as a
training job's later checkpoints do: its S3 clients exist (fsspec's instance
cache, on by default), so neither method's timing includes making them.
Requests are counted for the timed save and load only.

    python benchmarks/s3.py --mib 256 --out bench_out/s3.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import free_port  # noqa: E402

from dcp_safetensors import SafetensorsReader, SafetensorsWriter  # noqa: E402

METHODS = ["dcp_safetensors", "torch_fsspec_distcp"]


def rank_main(rank, world, port, method, url, options, mib, rows_per_tensor, threads, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    n = max(1, mib * 2**20 // (rows_per_tensor * 1024 * 4))
    g = torch.Generator().manual_seed(0)
    full = {f"layers.{i}.weight": torch.randn(rows_per_tensor, 1024, generator=g) for i in range(n)}
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}

    def make(at: str):
        if method == "dcp_safetensors":
            return (SafetensorsWriter(at, storage_options=options, write_threads=threads),
                    SafetensorsReader(at, storage_options=options, read_threads=threads))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        return FsspecWriter(at, **options), FsspecReader(at, **options)

    warm_writer, warm_reader = make(url + "-warmup")
    dcp.save(sd, storage_writer=warm_writer)
    dcp.load({k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1)]) for k, v in full.items()}, storage_reader=warm_reader)
    dist.barrier()
    if rank == 0:  # the parent resets the request counters, then lets the timed round start
        out["warm"] = True
        while not out.get("go"):
            time.sleep(0.01)
    writer, reader = make(url)
    dist.barrier()
    start = time.perf_counter()
    dcp.save(sd, storage_writer=writer)
    dist.barrier()
    save_s = time.perf_counter() - start
    target = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1)]) for k, v in full.items()}
    dist.barrier()
    start = time.perf_counter()
    dcp.load(target, storage_reader=reader)
    dist.barrier()
    load_s = time.perf_counter() - start
    ok = all(torch.equal(target[k].full_tensor(), full[k]) for k in full)
    if rank == 0:
        moved = 0
        if method == "dcp_safetensors":
            layout = writer._save.layout  # the coordinator's frozen plan of this save
            moved = layout.moved_bytes
        nbytes = sum(v.numel() * v.element_size() for v in full.values())
        out.update(method=method, state_bytes=nbytes, save_s=save_s, load_s=load_s, moved_between_ranks=moved, correct=ok)
    dist.destroy_process_group()


def run(mib: int, rows: int, threads: int, methods: list[str] = METHODS) -> list[dict]:
    """Each method in fresh processes against one moto server; one result dict per method."""
    from conftest import S3Server

    server = S3Server()
    results = []
    try:
        for method in methods:
            server.proxy.stats.reset()
            prefix = f"bench-{method}"
            manager = mp.Manager()
            out = manager.dict()
            # fsspec's instance cache on, as users run it (the tests turn it off for fault injection).
            options = {k: v for k, v in server.storage_options.items() if k != "skip_instance_cache"}
            ranks = mp.spawn(
                rank_main,
                args=(2, free_port(), method, server.url(prefix), options, mib, rows, threads, out),
                nprocs=2,
                join=False,
            )
            while not ranks.join(timeout=0.05):
                if out.get("warm") and not out.get("go"):
                    server.proxy.stats.reset()
                    out["go"] = True
            r = {k: v for k, v in out.items() if k not in ("warm", "go")}
            stats = server.proxy.stats
            r["requests"] = dict(stats.requests)
            r["uploaded_bytes"] = stats.body_bytes["UploadPart"] + stats.body_bytes["PutObject"]
            stored = server.client.list_objects_v2(Bucket=server.bucket, Prefix=prefix + "/").get("Contents", [])
            r["stored_bytes"] = sum(o["Size"] for o in stored)
            # Tensor data goes up as UploadPart only; small files (the index, our commit record
            # of a few KB that is deleted after the commit) are PutObjects.
            r["data_uploaded_bytes"] = stats.body_bytes["UploadPart"]
            r["data_stored_bytes"] = sum(o["Size"] for o in stored if o["Key"].endswith((".safetensors", ".distcp")))
            results.append(r)
    finally:
        server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2048, help="rows per 1024-column fp32 tensor")
    parser.add_argument("--threads", type=int, default=8, help="our concurrent uploads / ranged GETs per rank")
    parser.add_argument("--out", default="bench_out/s3.json")
    args = parser.parse_args()
    results = run(args.mib, args.rows, args.threads)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("| method | save MB/s | load MB/s | requests (save+load) | uploaded MB | stored MB | moved between ranks MB | correct |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        mb = r["state_bytes"] / 1e6
        print(
            f"| {r['method']} | {mb / r['save_s']:.0f} | {mb / r['load_s']:.0f} | {sum(r['requests'].values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(r['requests'].items()))}) | {r['uploaded_bytes'] / 1e6:.1f} | "
            f"{r['stored_bytes'] / 1e6:.1f} | {r['moved_between_ranks'] / 1e6:.1f} | {r['correct']} |"
        )


if __name__ == "__main__":
    main()
