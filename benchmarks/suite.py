"""Benchmark suite (issues 6 and 2-D layouts): save/load of FSDP2, FSDP2 x TP, HSDP x TP and EP x TP states.

The matrix is storage (``--dir``, one or more directories: local disk, tmpfs)
x parallel layout (``--layout``, ``benchmarks/layouts.py``) x world size x
dtype x state size. For every configuration each method runs ``--repeats``
timed rounds. By default (``--rounds-per-process 1``) every round of every
method runs in fresh processes (one per rank), so its peak RSS is its own, and
the methods' order is reversed from one round to the next (ours, .distcp;
.distcp, ours; ...) and from one configuration to the next, so no method
always runs first on a disk that is still writing back the previous one's
bytes. In those processes: build the state (meta device, materialised shard by
shard), do ONE untimed warm-up save + load to a scratch directory (the first
save of a fresh process pays one-off costs), then the timed rounds of: save,
evict the page cache of the written files (fsync + ``POSIX_FADV_DONTNEED``; a
no-op on tmpfs), load into a zeroed sharded state, compare every byte with the
source. The minimum and the median of the rounds are reported, and the ratio
ours / each method per phase (on both).

Layouts (``--layout``, details in ``benchmarks/layouts.py``): ``fsdp`` (the
default: a 1-D FSDP2 stack of ``width x width`` Linear layers), ``fsdp_tp``
(mesh ``("dp", "tp") = (world/2, 2)``: Colwise ``up``/Rowwise ``down`` pairs,
FSDP2 over TP), ``hsdp_tp`` (mesh ``("replicate", "shard", "tp") = (2, world/4, 2)``),
``ep_tp`` (fused expert weights ``[E, in, out]`` on ``("ep", "tp") = (world/2, 2)``).
A layout that needs more ranks than a ``--world`` gives is skipped with a note.

Storage (``--dir``): each directory is one axis value, recorded in the
configuration as ``"storage": "tmpfs"`` (its filesystem is tmpfs/ramfs, e.g.
``/dev/shm``: the software's overhead without disk noise) or ``"disk"``.
Default: a temp dir on disk and one under ``/dev/shm`` (when it exists; a tmpfs
configuration is skipped with a note unless the tmpfs has room for 3x its state).

Methods (``--methods``):

* ``ours``: ``SafetensorsWriter`` / ``SafetensorsReader``. Its save also
  reports the bytes moved between ranks (the coordinator's plan,
  ``writer._save.layout``; 0 on POSIX storage) next to the bytes written.
  Its load checks every block it reads (the default).
* ``ours_unchecked``: the same, loading with ``verify_checksums=False``: the
  cost of the checks is the ratio of the two load rows.
* ``torch_hf``: ``HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True)``
  / ``HuggingFaceStorageReader`` on the consolidated output.
* ``torch_distcp``: ``FileSystemWriter`` / ``FileSystemReader`` (.distcp).
* ``rank0``: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` +
  ``safetensors.torch.save_file`` (+ fsync) on rank 0 / ``load_file`` on rank 0 +
  ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``.
* ``limit``: one process writes the same number of bytes sequentially from a
  64 MiB buffer and fsyncs once, then reads them back after ``POSIX_FADV_DONTNEED``.

Then (unless ``--no-s3``) ours vs torch's ``FsspecWriter``/``FsspecReader``
and s3torchconnector's DCP writer/reader through SeaweedFS on 127.0.0.1
(``--s3-server moto`` for moto; ``benchmarks/s3.py``).

    python benchmarks/suite.py                      # default matrix (make bench)
    python benchmarks/suite.py --quick              # smoke run
    python benchmarks/suite.py --gib 0.25 1 4 --dtype fp32 bf16 --world 2 4 --repeats 3
    python benchmarks/suite.py --layout fsdp fsdp_tp hsdp_tp ep_tp --world 4 --methods ours torch_distcp \\
        --dir /var/tmp/bench /dev/shm/bench         # 2-D/3-D layouts, disk and tmpfs side by side
    python benchmarks/suite.py --device cuda --world 8   # NCCL, states on GPUs

Writes ``--out`` (JSON) and prints the tables; ``--update-docs`` also rewrites
the results section of docs/benchmarks.md, the README's table and
docs/img/bench.png (``benchmarks/report.py`` does the same from a saved JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timedelta, timezone

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Imported once here; forked ranks inherit them. torch._dynamo: a sub-mesh (mesh["tp"]) and FSDP2's
# state dict import it lazily, ~1 s of CPU per rank otherwise (5-20 s per method run at 4 ranks on 2 cores).
import torch._dynamo  # noqa: E402,F401
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.fsdp  # noqa: E402,F401
import torch.distributed.tensor.parallel  # noqa: E402,F401
from common import PeakRSS, evict, free_port, io_bytes, storage_of, tree_bytes  # noqa: E402
from layouts import LAYOUTS, build, check_placements, make_mesh, mesh_of, state_bytes  # noqa: E402

import dcp_safetensors  # noqa: E402,F401

METHODS = ["ours", "ours_unchecked", "torch_hf", "torch_distcp", "rank0", "limit"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHUNK = 64 << 20  # the limit's write/read unit
TMPFS_ROOM = 3  # a tmpfs configuration runs when the tmpfs has room for this many times its state


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_once(method: str, path: str, model, sd: dict, max_shard_size: str = "5GB", min_files: int | None = None):
    """One save; returns ours' writer (its plan has the bytes moved between ranks), else None.

    ``max_shard_size`` and ``min_files`` are ours' (the other methods have no such knobs).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if method in ("ours", "ours_unchecked"):
        from dcp_safetensors import SafetensorsWriter

        writer = SafetensorsWriter(path, max_shard_size=max_shard_size, min_files=min_files)
        dcp.save(sd, storage_writer=writer)
        return writer
    if method == "torch_hf":
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save(sd, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True, enable_consolidation=True))
    elif method == "torch_distcp":
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path))
    elif method == "rank0":
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
            file = os.path.join(path, "model.safetensors")
            save_file(full, file)
            _sync(file)  # durable like the others (DCP's writers and ours fsync)
        del full
    else:
        raise ValueError(method)
    return None


def data_file_count(path: str) -> int:
    """Files of tensor data a save wrote (``.safetensors``, ``.distcp``), anywhere under ``path``."""
    return sum(f.endswith((".safetensors", ".distcp")) for _, _, files in os.walk(path) for f in files)


def moved_between_ranks(writer) -> int | None:
    """Bytes ours' save plan sends from rank to rank (on the coordinator; None elsewhere)."""
    save = getattr(writer, "_save", None)
    if save is None:
        return None
    return save.layout.moved_bytes


def load_once(method: str, path: str, model, sd: dict) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if method in ("ours", "ours_unchecked"):
        from dcp_safetensors import SafetensorsReader

        dcp.load(sd, storage_reader=SafetensorsReader(path, verify_checksums=method == "ours"))
    elif method == "torch_hf":
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        dcp.load(sd, storage_reader=HuggingFaceStorageReader(path))
    elif method == "torch_distcp":
        dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
    elif method == "rank0":
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = load_file(os.path.join(path, "model.safetensors")) if dist.get_rank() == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    else:
        raise ValueError(method)


def rank_main(rank: int, world: int, port: int, method: str, cfg: dict, rounds: int, root: str, out: dict) -> None:
    """One rank of one method: warm-up, then ``rounds`` timed save/evict/load/compare rounds."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg["timeout_s"]),
        **({"device_id": device} if cuda else {}),
    )
    layout = cfg["layout"]
    mesh = make_mesh(layout, world, device.type)
    dtype = DTYPES[cfg["dtype"]]
    src = build(layout, cfg["gib"], cfg["width"], dtype, device, mesh, seed=0)
    dst = build(layout, cfg["gib"], cfg["width"], dtype, device, mesh, seed=None)
    src_sd = get_model_state_dict(src)
    dst_sd = get_model_state_dict(dst)
    check_placements(layout, src_sd)
    # The state's size, each replica once (a DTensor's numel is its global one).
    nbytes = sum(v.numel() * v.element_size() for v in src_sd.values())

    def zero_dst() -> None:
        with torch.no_grad():
            for p in dst.parameters():
                p.to_local().zero_()
            for v in dst_sd.values():
                v.to_local().zero_()

    def all_equal() -> bool:
        loaded = get_model_state_dict(dst) if method == "rank0" else dst_sd
        ok = all(torch.equal(src_sd[k].to_local(), loaded[k].to_local()) for k in src_sd)
        flag = torch.tensor(int(ok), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def clear(path: str) -> None:
        if rank == 0 and os.path.exists(path):
            shutil.rmtree(path)
        dist.barrier()

    def timed(fn) -> tuple[dict, object]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated() if cuda else 0
        dist.barrier()
        read0, write0 = io_bytes()
        with PeakRSS() as mem:
            started = time.perf_counter()
            result = fn()
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            seconds = time.perf_counter() - started
        read1, write1 = io_bytes()
        return {
            "s": seconds,
            "extra_rss": mem.extra,
            "gpu_extra": (torch.cuda.max_memory_allocated() - gpu_base) if cuda else 0,
            "io_read": read1 - read0,
            "io_write": write1 - write0,
        }, result

    # Warm-up: one untimed save + load to a scratch directory.
    warm = os.path.join(root, "warmup")
    clear(warm)
    shards, min_files = cfg.get("max_shard_size", "5GB"), cfg.get("min_files")
    save_once(method, warm, src, src_sd, shards, min_files)
    zero_dst()
    load_once(method, warm, dst, dst_sd)
    warm_ok = all_equal()
    clear(warm)

    done = []
    path = os.path.join(root, "ckpt")
    for _ in range(rounds):
        clear(path)
        save, writer = timed(lambda: save_once(method, path, src, src_sd, shards, min_files))
        on_disk = tree_bytes(path) if rank == 0 else 0
        data_files = data_file_count(path) if rank == 0 else 0
        if rank == 0:
            evict(path)
        zero_dst()
        dist.barrier()
        load, _ = timed(lambda: load_once(method, path, dst, dst_sd))
        done.append({"save": save, "load": load, "bytes_on_disk": on_disk, "data_files": data_files,
                     "moved": moved_between_ranks(writer),
                     "correct": all_equal() and warm_ok})
    clear(path)
    out[rank] = {"state_bytes": nbytes, "rounds": done}
    dist.destroy_process_group()


def limit_main(_: int, state_bytes: int, repeats: int, root: str, out: dict) -> None:
    """The disk's limit: ``state_bytes`` written sequentially by one process with one fsync, read back cold."""
    buf = bytearray(os.urandom(1 << 20) * (CHUNK >> 20))
    view = memoryview(buf)
    back = bytearray(CHUNK)
    path = os.path.join(root, "limit.bin")

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = state_bytes
            while left:
                left -= os.write(fd, view[: min(CHUNK, left)])
            os.fsync(fd)
        finally:
            os.close(fd)

    def read() -> int:
        fd = os.open(path, os.O_RDONLY)
        total = 0
        try:
            while n := os.readv(fd, [back]):
                total += n
        finally:
            os.close(fd)
        return total

    def timed(fn) -> tuple[dict, object]:
        read0, write0 = io_bytes()
        with PeakRSS() as mem:
            started = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - started
        read1, write1 = io_bytes()
        return {"s": seconds, "extra_rss": mem.extra, "gpu_extra": 0,
                "io_read": read1 - read0, "io_write": write1 - write0}, result

    write()  # warm-up, like the other methods
    evict(root)
    read()
    rounds = []
    for _ in range(repeats):
        os.unlink(path)
        save, _ = timed(write)
        evict(root)
        load, total = timed(read)
        # The bytes are a repeated 1 MiB random pattern: check the count and the last chunk read.
        tail = state_bytes % CHUNK or min(CHUNK, state_bytes)
        ok = total == state_bytes and back[:tail] == buf[:tail]
        rounds.append({"save": save, "load": load, "bytes_on_disk": os.path.getsize(path), "moved": None,
                       "correct": ok})
    os.unlink(path)
    out[0] = {"state_bytes": state_bytes, "rounds": rounds}


def state_bytes_of(cfg: dict) -> int:
    """What ``build`` allocates for ``cfg``'s layout, without building it (the limit writes this many bytes)."""
    elsize = torch.empty((), dtype=DTYPES[cfg["dtype"]]).element_size()
    return state_bytes(cfg.get("layout", "fsdp"), cfg["gib"], cfg["width"], elsize, cfg["world"])


def summarize(method: str, cfg: dict, per_rank: dict) -> dict:
    """Minimum and median over the rounds; peak RSS maxima over the rounds, rank 0 apart from the others."""
    ranks = sorted(per_rank)
    nbytes = per_rank[0]["state_bytes"]
    rounds = [[per_rank[r]["rounds"][i] for r in ranks] for i in range(len(per_rank[0]["rounds"]))]
    result: dict = {"config": cfg, "method": method, "state_bytes": nbytes, "repeats": len(rounds)}
    if method != "limit":
        shape, names = mesh_of(cfg["layout"], cfg["world"])
        result["mesh"] = dict(zip(names, shape))
    # Where this method ran in each round's order (0: first), and in which process set.
    result["order"] = [rd[0].get("position", 0) for rd in rounds]
    result["process_set"] = [rd[0].get("set", 0) for rd in rounds]
    for phase in ("save", "load"):
        seconds = [rd[0][phase]["s"] for rd in rounds]
        median = statistics.median(seconds)
        result[f"{phase}_s"] = median
        result[f"{phase}_s_min"] = min(seconds)
        result[f"{phase}_s_all"] = seconds
        result[f"{phase}_MBps"] = nbytes / 1e6 / median
        result[f"{phase}_MBps_best"] = nbytes / 1e6 / min(seconds)
        extra = [max(rd[r][phase]["extra_rss"] for rd in rounds) for r in range(len(ranks))]
        result[f"{phase}_extra_rss_per_rank"] = extra
        result[f"{phase}_extra_rss_rank0"] = extra[0]
        result[f"{phase}_extra_rss_others_max"] = max(extra[1:], default=None)
        result[f"{phase}_gpu_extra_max"] = max(rd[r][phase]["gpu_extra"] for rd in rounds for r in range(len(ranks)))
        key = "io_write" if phase == "save" else "io_read"
        result[f"{phase}_{key}_bytes"] = statistics.median(sum(x[phase][key] for x in rd) for rd in rounds)
    result["bytes_on_disk"] = rounds[-1][0]["bytes_on_disk"]
    result["data_files"] = rounds[-1][0].get("data_files")
    moved = [rd[0].get("moved") for rd in rounds]
    result["moved_between_ranks_bytes"] = None if None in moved else max(moved)
    result["correct"] = all(x["correct"] for rd in rounds for x in rd)
    return result


def run_method(method: str, cfg: dict, root: str, rounds: int) -> dict:
    """``method`` in new processes (one per rank), warm-up + ``rounds`` timed rounds; every rank's raw figures."""
    path = tempfile.mkdtemp(dir=root, prefix=f"{method}-")
    manager = mp.Manager()
    out = manager.dict()
    # CPU: fork from this process, which has imported torch, DCP and ours but started no thread
    # pool, so a rank starts in well under a second instead of re-importing everything (2 cores).
    # CUDA cannot be forked: spawn.
    start = "spawn" if cfg["device"] == "cuda" else "fork"
    try:
        if method == "limit":
            mp.start_processes(limit_main, args=(state_bytes_of(cfg), rounds, path, out), nprocs=1,
                               start_method=start)
        else:
            mp.start_processes(rank_main, args=(cfg["world"], free_port(), method, cfg, rounds, path, out),
                               nprocs=cfg["world"], start_method=start)
        return dict(out)
    finally:
        manager.shutdown()
        shutil.rmtree(path, ignore_errors=True)


def process_sets(repeats: int, per_process: int) -> list[int]:
    """Rounds per process set: ``repeats`` rounds, at most ``per_process`` in one set of processes."""
    per = max(1, per_process)
    return [min(per, repeats - i) for i in range(0, max(1, repeats), per)]


def run_config(cfg: dict, methods: list[str], root: str, first: int) -> list[dict]:
    """Every method on ``cfg``: one result per method (its summary, or its error), in ``methods``' order.

    Process set ``s`` runs the methods in ``methods``' order when ``first + s`` is even, reversed
    otherwise, so with one round per set the order alternates round by round.
    """
    raw: dict[str, dict] = {m: {} for m in methods}
    errors: dict[str, str] = {}
    walls = dict.fromkeys(methods, 0.0)
    sets = process_sets(cfg["repeats"], cfg["rounds_per_process"])
    for s, rounds in enumerate(sets):
        order = methods if (first + s) % 2 == 0 else methods[::-1]
        for position, method in enumerate(order):
            if method in errors:
                continue
            print(f"[suite] {describe(cfg)}: {method} (set {s + 1}/{len(sets)}, {rounds} round(s), "
                  f"position {position + 1}/{len(order)})", flush=True)
            started = time.perf_counter()
            try:
                data = run_method(method, cfg, root, rounds)
                for rank, got in data.items():
                    for rd in got["rounds"]:
                        rd.update(set=s, position=position)
                    mine = raw[method].setdefault(rank, {"state_bytes": got["state_bytes"], "rounds": []})
                    mine["rounds"].extend(got["rounds"])
            except Exception as exc:  # one failing method must not lose the rest of a long matrix
                traceback.print_exc()
                errors[method] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            walls[method] += time.perf_counter() - started
    results = []
    for method in methods:
        if method in errors:
            result = {"config": cfg, "method": method, "error": errors[method]}
        else:
            try:
                result = summarize(method, cfg, raw[method])
            except Exception as exc:
                traceback.print_exc()
                result = {"config": cfg, "method": method, "error": f"{type(exc).__name__}: {exc}".strip()[:2000]}
        result["process_wall_s"] = walls[method]
        results.append(result)
    return results


def describe(cfg: dict) -> str:
    shards, min_files = cfg.get("max_shard_size", "5GB"), cfg.get("min_files")
    return (f"{cfg['storage']} {cfg['layout']} {cfg['gib']:g} GiB {cfg['dtype']} world={cfg['world']} "
            f"{cfg['device']}" + ("" if shards == "5GB" else f" max_shard_size={shards}")
            + ("" if min_files is None else f" min_files={min_files}"))


def add_ratios(runs: list[dict]) -> None:
    """``ours_speedup``: ours' throughput / this method's, per phase, within one configuration.

    ``{phase}_ours_speedup`` compares the medians, ``{phase}_ours_speedup_min`` the minima.
    """
    for r in runs:
        ours = next((o for o in runs if o["method"] == "ours" and o["config"] == r["config"] and "error" not in o), None)
        for phase in ("save", "load"):
            ok = ours is not None and "error" not in r
            r[f"{phase}_ours_speedup"] = r[f"{phase}_s"] / ours[f"{phase}_s"] if ok else None
            r[f"{phase}_ours_speedup_min"] = r[f"{phase}_s_min"] / ours[f"{phase}_s_min"] if ok else None


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import psutil

    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_GiB": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, nargs="+", default=[0.25, 1.0], help="state sizes in GiB")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes (ranks)")
    parser.add_argument("--layout", nargs="+", default=["fsdp"], choices=LAYOUTS,
                        help="parallel layouts (benchmarks/layouts.py); one that does not fit a world is skipped")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (minimum and median reported)")
    parser.add_argument("--rounds-per-process", type=int, default=1,
                        help="timed rounds per set of fresh processes (each set pays one warm-up); 1: every "
                             "round in fresh processes and the method order alternates round by round; "
                             "= --repeats: one process set per method (faster; the order alternates per configuration)")
    parser.add_argument("--width", type=int, default=4096, help="Linear layers are width x width")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: states on GPUs, NCCL")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="ours' max_shard_size: smaller gives more files, which ranks write side by side")
    parser.add_argument("--min-files", type=int, default=None,
                        help="ours' min_files (default: the writer's, one file per rank up to 8 on POSIX)")
    parser.add_argument("--dir", nargs="+", default=None,
                        help="where checkpoints are written, one storage axis value each (default: a temp dir "
                             "on disk and one under /dev/shm)")
    parser.add_argument("--s3-mib", type=int, default=256, help="state size of the S3 comparison")
    parser.add_argument("--s3-threads", type=int, default=8, help="our concurrent uploads / ranged GETs per rank")
    parser.add_argument("--s3-server", choices=["seaweed", "moto"], default="seaweed",
                        help="the S3 comparison's server: SeaweedFS (a real object store), or moto (slow, Python)")
    parser.add_argument("--s3-rounds", type=int, default=3, help="timed rounds per S3 method, alternating order")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB fp32, 2 ranks, 1 repeat, 16 MiB S3")
    parser.add_argument("--timeout-s", type=int, default=1800, help="process-group timeout per collective")
    parser.add_argument("--label", default="", help="a note stored with the results and shown in the docs")
    parser.add_argument("--out", default="bench_out/suite.json")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite docs/benchmarks.md's results, the README table and docs/img/bench.png")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds_per_process < 1:
        parser.error("--repeats and --rounds-per-process are at least 1")
    if args.quick:
        args.gib, args.dtype, args.world, args.repeats, args.s3_mib, args.s3_rounds = [0.0625], ["fp32"], [2], 1, 16, 1
    return args


def storage_roots(dirs: list[str] | None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``(root, storage, filesystem)`` per storage axis value, and the temp roots to delete at the end."""
    made = []
    if dirs is None:
        made.append(tempfile.mkdtemp(prefix="dcp-bench-"))
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            made.append(tempfile.mkdtemp(prefix="dcp-bench-", dir="/dev/shm"))
        else:
            print("[suite] note: no writable /dev/shm, no tmpfs rows", flush=True)
        dirs = made
    roots = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        roots.append((d, *storage_of(d)))
    return roots, made


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    roots, made = storage_roots(args.dir)
    runs: list[dict] = []
    skipped: list[str] = []
    configs = 0

    def skip(note: str) -> None:
        print(f"[suite] skipped: {note}", flush=True)
        skipped.append(note)

    try:
        for root, storage, fs in roots:
            for layout in args.layout:
                for world in args.world:
                    if isinstance(fits := mesh_of(layout, world), str):
                        skip(f"{layout} at world {world}: {fits}")
                        continue
                    for dtype in args.dtype:
                        for gib in args.gib:
                            cfg = {"gib": gib, "dtype": dtype, "world": world, "device": args.device,
                                   "width": args.width, "repeats": args.repeats,
                                   "rounds_per_process": args.rounds_per_process, "timeout_s": args.timeout_s,
                                   "layout": layout, "storage": storage, "fs": fs, "dir": root,
                                   "max_shard_size": args.max_shard_size, "min_files": args.min_files}
                            need = TMPFS_ROOM * state_bytes_of(cfg)
                            if storage == "tmpfs" and (free := shutil.disk_usage(root).free) < need:
                                skip(f"{describe(cfg)} on {root}: {free / 2**30:.1f} GiB free on the tmpfs, "
                                     f"{TMPFS_ROOM}x the state is {need / 2**30:.1f} GiB")
                                continue
                            runs.extend(run_config(cfg, args.methods, root, configs))
                            configs += 1
    finally:
        for root in made:
            shutil.rmtree(root, ignore_errors=True)
    add_ratios(runs)
    s3 = None
    if not args.no_s3:
        import s3 as s3_bench

        print(f"[suite] S3 ({args.s3_server}): {args.s3_mib} MiB", flush=True)
        s3 = s3_bench.run(args.s3_mib, 2048, args.s3_threads, server=args.s3_server, rounds=args.s3_rounds)
    results = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "label": args.label,
            "argv": sys.argv[1:] if argv is None else argv,
            "wall_s": round(time.perf_counter() - started, 1),
            "format": 2,
            "skipped": skipped,
        },
        "runs": runs,
        "s3": s3,
    }
    import report

    results["targets"] = report.targets(results)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(report.markdown(results))
    if args.update_docs:
        report.update_docs(results)
    return results


if __name__ == "__main__":
    main()
