"""``make demo``: a real 2-rank FSDP2 save and a resharding load on the local filesystem.

Two gloo ranks on CPU shard a small transformer-like model with
``fully_shard``, save it with :class:`SafetensorsWriter` (each rank writing
its own bytes into the final files), then (a) load it back into a freshly
initialised 2-rank FSDP2 model and (b) reshard it into one unsharded model in
this process, checking every tensor bit for bit.

Usage (spawns two processes; ``make demo`` runs it)::

    from dcp_safetensors.demo import run_demo
    run_demo("/tmp/demo-ckpt", hidden=256)
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from dcp_safetensors.checkpoint import read_checkpoint
from dcp_safetensors.names import BLOCKS_FILE
from dcp_safetensors.reader import SafetensorsReader
from dcp_safetensors.writer import SafetensorsWriter

__all__ = ["DemoModel", "run_demo"]


class DemoModel(nn.Module):
    """A small decoder-shaped stack: embedding, MLP blocks, norm, untied head."""

    def __init__(self, vocab: int = 1000, hidden: int = 512, layers: int = 4) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(idx)
        for block in self.layers:
            h = h + block(h)
        return self.lm_head(self.norm(h))


def _build(hidden: int, seed: int = 0) -> DemoModel:
    torch.manual_seed(seed)
    return DemoModel(hidden=hidden)


def _rank_main(rank: int, world: int, port: int, path: str, hidden: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded(seed: int) -> DemoModel:
        model = _build(hidden, seed)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = sharded(seed=0)
    sd: dict[str, Any] = dict(get_model_state_dict(model))
    dist.barrier()
    start = time.perf_counter()
    dcp.save(sd, storage_writer=SafetensorsWriter(path, max_shard_size="50MB"))
    save_s = time.perf_counter() - start

    fresh = sharded(seed=1)
    target: dict[str, Any] = dict(get_model_state_dict(fresh))
    dist.barrier()
    start = time.perf_counter()
    dcp.load(target, storage_reader=SafetensorsReader(path))
    load_s = time.perf_counter() - start
    mismatched = [k for k in sd if not torch.equal(sd[k].to_local(), target[k].to_local())]
    if rank == 0:
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        print(
            f"[2 ranks FSDP2] save {nbytes / 1e6:.1f} MB in {save_s:.2f} s ({nbytes / 1e6 / save_s:.0f} MB/s), "
            f"load back into a fresh FSDP2 model in {load_s:.2f} s ({nbytes / 1e6 / load_s:.0f} MB/s); "
            f"mismatched tensors: {mismatched or 'none'}"
        )
    dist.destroy_process_group()
    if mismatched:
        print(f"rank {rank}: tensors differ after load: {mismatched}", file=sys.stderr)
    _exit_without_finalizing(1 if mismatched else 0)


def _exit_without_finalizing(code: int) -> NoReturn:
    """End a gloo rank's process after ``destroy_process_group`` without finalizing the interpreter.

    gloo's worker threads outlive ``destroy_process_group`` (torch 2.14 keeps
    the group alive in C++) and release each finished work after the caller's
    ``wait()`` has returned; a barrier's work holds the works before it, whose
    tensors' Python objects need the GIL to be released. If that happens once
    ``Py_FinalizeEx`` has begun, CPython ends the thread with ``pthread_exit``,
    whose unwinding through a noexcept C++ frame calls ``std::terminate``:
    "terminate called without an active exception", SIGABRT, about once in a
    hundred runs here (a core dump showed a ``pt_gloo_runloop`` thread in
    ``~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    PyThread_exit_thread`` while the main thread was in ``Py_FinalizeEx``).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(path: str | None = None, *, hidden: int = 1024) -> None:
    """Save from 2 FSDP2 ranks, load back into FSDP2 and into one plain model; print what happened."""
    path = path or tempfile.mkdtemp(prefix="dcp-safetensors-demo-")
    print(f"checkpoint directory: {path}")
    mp.spawn(_rank_main, args=(2, _free_port(), path, hidden), nprocs=2, join=True)

    ckpt = read_checkpoint(path)
    total = 0
    for name in sorted(ckpt.headers):
        size = os.path.getsize(os.path.join(path, name))
        total += size
        print(f"  {name:40s} {size / 1e6:8.2f} MB  {len(ckpt.headers[name].tensors):3d} tensors")
    print(f"  {'model.safetensors.index.json':40s} snapshot {ckpt.snapshot}")
    blocks = sum(len(t.starts) for t in ckpt.blocks.values())
    print(f"  {BLOCKS_FILE:40s} the CRC-32 of {blocks} blocks: every load checks the bytes it reads")

    reference = _build(hidden, seed=0).state_dict()
    plain = _build(hidden, seed=2)
    target = plain.state_dict()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=SafetensorsReader(path), no_dist=True)
    load_s = time.perf_counter() - start
    mismatched = [k for k in reference if not torch.equal(reference[k], target[k])]
    print(
        f"[1 process] resharding load into an unsharded model: {total / 1e6:.1f} MB in {load_s:.2f} s "
        f"({total / 1e6 / max(load_s, 1e-9):.0f} MB/s); mismatched tensors: {mismatched or 'none'}"
    )
    import safetensors.torch

    check = safetensors.torch.load_file(os.path.join(path, sorted(ckpt.headers)[0]))
    print(f"safetensors.torch.load_file reads {sorted(ckpt.headers)[0]} unchanged: {len(check)} tensors")
    if mismatched:
        raise SystemExit(f"tensors differ after the resharding load: {mismatched}")
