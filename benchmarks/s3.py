"""Save/load through S3 on 127.0.0.1: ours next to torch's and s3torchconnector's DCP writers/readers.

The server is SeaweedFS (a real object store, the ``weed`` binary of the test
extra) by default, or moto (``--server moto``, which reads a whole object per
ranged GET and assembles uploads in Python: never judge speed on it). Each
method saves a 2-rank FSDP2-style ``Shard(0)`` state and loads it back into
``Shard(1)`` (every rank reads other ranks' bytes), in fresh processes per
round, methods in alternating order, after one untimed save and load to
another prefix (clients made, as in a training job's later checkpoints).

Requests and bytes are counted per method in one more round through the
test suite's counting proxy (a Python process: on SeaweedFS the timed rounds
go to the server directly, so the proxy's copies are not timed).

Methods: ``dcp_safetensors`` (ours, ``write_threads``/``read_threads``
``--threads``), torch's ``FsspecWriter``/``FsspecReader`` with
``thread_count`` 1 and 8 (``torch_fsspec_distcp``, ``..._t8``), and
s3torchconnector's ``S3StorageWriter``/``S3StorageReader`` with
``thread_count`` 1 and 8 (``s3torchconnector``, ``..._t8``; the bench extra
installs it; endpoint from ``AWS_ENDPOINT_URL``, path-style addressing).

    python benchmarks/s3.py --mib 256 --rounds 3 --out bench_out/s3.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import free_port  # noqa: E402

from dcp_safetensors import SafetensorsReader, SafetensorsWriter  # noqa: E402

METHODS = ["dcp_safetensors", "torch_fsspec_distcp", "torch_fsspec_distcp_t8", "s3torchconnector", "s3torchconnector_t8"]
SERVERS = ["seaweed", "moto"]


def _make(method: str, url: str, options: dict, threads: int):
    """``(writer, reader)`` of ``method`` at ``url``."""
    if method == "dcp_safetensors":
        return (SafetensorsWriter(url, storage_options=options, write_threads=threads),
                SafetensorsReader(url, storage_options=options, read_threads=threads))
    count = 8 if method.endswith("_t8") else 1
    if method.startswith("torch_fsspec"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        return FsspecWriter(url, thread_count=count, **options), FsspecReader(url, **options)
    from s3torchconnector import S3ClientConfig
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

    config = S3ClientConfig(force_path_style=True)
    region = options["client_kwargs"]["region_name"]
    return (S3StorageWriter(region, url, s3client_config=config, thread_count=count),
            S3StorageReader(region, url, s3client_config=config))


def rank_main(rank, world, port, method, url, options, mib, rows_per_tensor, threads, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # s3torchconnector's client reads the endpoint and credentials from the environment.
    os.environ.update(AWS_ENDPOINT_URL=options["client_kwargs"]["endpoint_url"], AWS_ACCESS_KEY_ID=options["key"],
                      AWS_SECRET_ACCESS_KEY=options["secret"], AWS_REGION=options["client_kwargs"]["region_name"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    n = max(1, mib * 2**20 // (rows_per_tensor * 1024 * 4))
    g = torch.Generator().manual_seed(0)
    full = {f"layers.{i}.weight": torch.randn(rows_per_tensor, 1024, generator=g) for i in range(n)}
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}

    def target():
        return {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1)]) for k, v in full.items()}

    warm_writer, warm_reader = _make(method, url + "-warmup", options, threads)
    dcp.save(sd, storage_writer=warm_writer)
    dcp.load(target(), storage_reader=warm_reader)
    dist.barrier()
    if rank == 0:  # the parent resets the request counters, then lets the timed round start
        out["warm"] = True
        while not out.get("go"):
            time.sleep(0.01)
    writer, reader = _make(method, url, options, threads)
    dist.barrier()
    start = time.perf_counter()
    dcp.save(sd, storage_writer=writer)
    dist.barrier()
    save_s = time.perf_counter() - start
    loaded = target()
    dist.barrier()
    start = time.perf_counter()
    dcp.load(loaded, storage_reader=reader)
    dist.barrier()
    load_s = time.perf_counter() - start
    ok = all(torch.equal(loaded[k].full_tensor(), full[k]) for k in full)
    if rank == 0:
        moved = writer._save.layout.moved_bytes if method == "dcp_safetensors" else 0
        nbytes = sum(v.numel() * v.element_size() for v in full.values())
        out.update(method=method, state_bytes=nbytes, save_s=save_s, load_s=load_s, moved_between_ranks=moved, correct=ok)
    dist.destroy_process_group()


class _Server:
    """The S3 server, its counting proxy, and the endpoint the timed rounds use."""

    def __init__(self, kind: str) -> None:
        from conftest import S3Server, SeaweedS3
        from s3_proxy import S3Proxy

        self.kind = kind
        if kind == "moto":
            self._server = S3Server()
            self.proxy = self._server.proxy
            options = {k: v for k, v in self._server.storage_options.items() if k != "skip_instance_cache"}
            self.counted = self.timed = options  # moto is slow anyway: every round through the proxy
        else:
            self._root = tempfile.mkdtemp(prefix="bench-seaweedfs-")
            self._server = SeaweedS3(self._root)
            self.proxy = S3Proxy("127.0.0.1", self._server.port)
            self.timed = {k: v for k, v in self._server.options().items() if k != "skip_instance_cache"}
            self.timed["config_kwargs"] = {"retries": {"max_attempts": 3}}
            self.counted = {**self.timed, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self.proxy.port}",
                                                            "region_name": "us-east-1"}}
        self.client, self.bucket = self._server.client, self._server.bucket

    def url(self, prefix: str) -> str:
        return self._server.url(prefix)

    def close(self) -> None:
        if self.kind != "moto":
            self.proxy.close()
        self._server.close()
        if self.kind != "moto":
            shutil.rmtree(self._root, ignore_errors=True)


def _one(server: _Server, method: str, prefix: str, options: dict, mib: int, rows: int, threads: int) -> dict:
    """One round of ``method`` in fresh processes: its result dict."""
    manager = mp.Manager()
    out = manager.dict()
    ranks = mp.spawn(rank_main, args=(2, free_port(), method, server.url(prefix), options, mib, rows, threads, out),
                     nprocs=2, join=False)
    while not ranks.join(timeout=0.05):
        if out.get("warm") and not out.get("go"):
            server.proxy.stats.reset()
            out["go"] = True
    return {k: v for k, v in out.items() if k not in ("warm", "go")}


def run(mib: int, rows: int, threads: int, methods: list[str] = METHODS, server: str = "seaweed",
        rounds: int = 3) -> list[dict]:
    """Each method, ``rounds`` timed rounds in alternating order plus one counted round: a result per method.

    ``save_s``/``load_s`` are the minimum over the rounds (``save_s_all``/``load_s_all`` every round).
    """
    s3 = _Server(server)
    results = {m: {"method": m, "server": server, "save_s_all": [], "load_s_all": []} for m in methods}
    try:
        for r in range(rounds):
            for method in methods if r % 2 == 0 else methods[::-1]:
                got = _one(s3, method, f"bench-{method}-{r}", s3.timed, mib, rows, threads)
                res = results[method]
                res["save_s_all"].append(got["save_s"])
                res["load_s_all"].append(got["load_s"])
                res.update({k: v for k, v in got.items() if k not in ("save_s", "load_s", "correct")})
                res["correct"] = res.get("correct", True) and got["correct"]
        for method in methods:  # the counted round, through the proxy
            prefix = f"bench-{method}-counted"
            got = _one(s3, method, prefix, s3.counted, mib, rows, threads)
            res = results[method]
            stats = s3.proxy.stats
            res["requests"] = dict(stats.requests)
            res["uploaded_bytes"] = stats.body_bytes["UploadPart"] + stats.body_bytes["PutObject"]
            stored = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/").get("Contents", [])
            res["stored_bytes"] = sum(o["Size"] for o in stored)
            # Tensor data goes up as UploadPart or PutObject (s3torchconnector and fsspec PUT small
            # files whole); the index and our commit record are small PutObjects.
            res["data_uploaded_bytes"] = stats.body_bytes["UploadPart"]
            res["data_stored_bytes"] = sum(o["Size"] for o in stored if o["Key"].endswith((".safetensors", ".distcp")))
            res["correct"] = res["correct"] and got["correct"]
        for res in results.values():
            res["save_s"], res["load_s"] = min(res["save_s_all"]), min(res["load_s_all"])
    finally:
        s3.close()
    return list(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2048, help="rows per 1024-column fp32 tensor")
    parser.add_argument("--threads", type=int, default=8, help="our concurrent uploads / ranged GETs per rank")
    parser.add_argument("--server", choices=SERVERS, default="seaweed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--out", default="bench_out/s3.json")
    args = parser.parse_args()
    results = run(args.mib, args.rows, args.threads, args.methods, args.server, args.rounds)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    ours = next((r for r in results if r["method"] == "dcp_safetensors"), None)
    print(f"{args.mib} MiB fp32, 2 ranks, {args.server}, min of {args.rounds} rounds in alternating order; "
          "ours ÷ method is the method's time over ours'")
    print("| method | save s (min; all) | load s (min; all) | ours ÷ method, save / load | requests (counted round) "
          "| uploaded MB | stored MB | correct |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['save_s'] / ours['save_s']:.2f}x / {r['load_s'] / ours['load_s']:.2f}x" if ours else "-"
        print(
            f"| {r['method']} | {r['save_s']:.2f}; {', '.join(f'{x:.2f}' for x in r['save_s_all'])} "
            f"| {r['load_s']:.2f}; {', '.join(f'{x:.2f}' for x in r['load_s_all'])} | {ratio} "
            f"| {sum(r['requests'].values())} ({', '.join(f'{k} {v}' for k, v in sorted(r['requests'].items()))}) "
            f"| {r['uploaded_bytes'] / 1e6:.1f} | {r['stored_bytes'] / 1e6:.1f} | {r['correct']} |"
        )


if __name__ == "__main__":
    main()
