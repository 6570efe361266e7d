"""Run a 2-rank save that SIGKILLs one rank at a chosen point; used by test_crash.py.

Usage: python crash_worker.py PATH VALUE PHASE RANK [STORAGE_OPTIONS_JSON]
PHASE: none | mid-write | before-commit | mid-publish | after-commit | mid-upload (object stores)
The kill points are test hooks installed here by wrapping library functions;
the library itself has no test code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import dcp_safetensors.commit as commit_mod
from dcp_safetensors import SafetensorsWriter
from dcp_safetensors.storage import local as local_mod


def state(value: float, rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {f"w{i}": distribute_tensor(torch.full((512, 1024), value + i), mesh, [Shard(0)]) for i in range(6)}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(phase: str) -> None:
    if phase == "mid-write":
        original = local_mod.WritableFile.pwritev
        calls = {"n": 0}

        def pwritev(self, views, offset):
            calls["n"] += 1
            if calls["n"] == 3:
                die()
            return original(self, views, offset)

        local_mod.WritableFile.pwritev = pwritev
    elif phase == "mid-upload":
        from dcp_safetensors.storage import fsspec as fsspec_mod

        original_write = fsspec_mod._ObjectPartWriter.write
        uploads = {"n": 0}

        def write(self, part, views):
            uploads["n"] += 1
            if uploads["n"] == 2:
                die()
            return original_write(self, part, views)

        fsspec_mod._ObjectPartWriter.write = write
    elif phase == "before-commit":
        commit_mod.commit = lambda *a, **k: die()
    elif phase == "mid-publish":
        original_replace = local_mod.LocalStorage.replace
        calls = {"n": 0}

        def replace(self, src, dst):
            if commit_mod.STAGING_PREFIX in src and not src.endswith(".tmp"):
                calls["n"] += 1
                if calls["n"] == 2:
                    die()
            return original_replace(self, src, dst)

        local_mod.LocalStorage.replace = replace
    elif phase == "after-commit":
        original_commit = commit_mod.commit

        def commit_then_die(*a, **k):
            original_commit(*a, **k)
            die()

        commit_mod.commit = commit_then_die


def main(rank: int, world: int, port: int, path: str, value: float, phase: str, kill_rank: int, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    if rank == kill_rank:
        install_kill(phase)
    dcp.save(state(value, rank, world), storage_writer=SafetensorsWriter(path, max_shard_size="3MB", storage_options=options or None))
    dist.destroy_process_group()


if __name__ == "__main__":
    path, value, phase, kill_rank = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(main, args=(2, port, path, value, phase, kill_rank, options), nprocs=2, join=True)
