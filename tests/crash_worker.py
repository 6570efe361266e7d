"""Run a save on WORLD ranks that SIGKILLs one rank at a chosen point; used by test_crash.py.

Usage: python crash_worker.py PATH VALUE PHASE RANK [STORAGE_OPTIONS_JSON [WORLD]]
(test_crash.py calls :func:`run` in a process of ``helpers.process_context``, which
has imported torch and the package already: the same save, without a new interpreter.)
PHASE: none | planning | mid-write | before-commit | mid-publish | after-commit
(mid-write is a pwrite on POSIX, an UploadPart on object stores; the commit
phases hook the POSIX protocol in dcp_safetensors.commit or the object store's
commit record and roll-forward.)
The kill points are test hooks installed here by wrapping library functions;
the library itself has no test code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from helpers import free_port

import dcp_safetensors.commit as commit_mod
from dcp_safetensors import SafetensorsWriter
from dcp_safetensors.storage import local as local_mod
from dcp_safetensors.storage.rename_commit import RenameCommit


def state(value: float, rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {f"w{i}": distribute_tensor(torch.full((512, 1024), value + i), mesh, [Shard(0)]) for i in range(6)}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_on_call(owner, name: str, when, after: bool = False) -> None:
    """Wrap ``owner.name`` so the process SIGKILLs itself on the call for which ``when(n)`` is true."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if when(calls["n"], *args) and not after:
            die()
        result = original(*args, **kwargs)
        if when(calls["n"], *args) and after:
            die()
        return result

    setattr(owner, name, wrapper)


def install_kill(phase: str, object_store: bool) -> None:
    from dcp_safetensors.storage import s3 as s3_mod

    store = s3_mod.S3Storage
    if phase == "planning":
        _die_on_call(SafetensorsWriter, "prepare_global_plan", lambda n, *a: True)
    elif phase == "mid-write" and object_store:
        _die_on_call(s3_mod._UploadPartWriter, "write", lambda n, *a: n == 1)
    elif phase == "mid-write":
        _die_on_call(local_mod.WritableFile, "pwrite", lambda n, *a: n == 3)
    elif phase == "before-commit" and object_store:
        _die_on_call(store, "commit_save", lambda n, *a: True)
    elif phase == "before-commit":
        _die_on_call(RenameCommit, "commit", lambda n, *a: True)
    elif phase == "mid-publish" and object_store:
        # After the commit record and the first completed upload, before the index.
        _die_on_call(store, "retry", lambda n, self, what, *a: what.startswith("CompleteMultipartUpload"), after=True)
    elif phase == "mid-publish":
        _die_on_call(
            local_mod.LocalStorage,
            "replace",
            lambda n, self, src, dst: commit_mod.STAGING_PREFIX in src and not src.endswith(".tmp") and dst != commit_mod.INDEX_NAME,
            after=True,
        )
    elif phase == "after-commit":
        _die_on_call(store if object_store else RenameCommit, "commit_save" if object_store else "commit", lambda n, *a: True, after=True)


def main(rank: int, world: int, port: int, path: str, value: float, phase: str, kill_rank: int, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    if rank == kill_rank:
        install_kill(phase, object_store="://" in path)
    dcp.save(state(value, rank, world), storage_writer=SafetensorsWriter(path, max_shard_size="3MB", storage_options=options or None))
    dist.destroy_process_group()


def run(path: str, value: float, phase: str, kill_rank: int, options: dict, world: int = 2, log: str | None = None) -> None:
    """The save on ``world`` forked ranks; raises once a rank dies (the one killed, or any other).

    Forked ranks: this process has imported torch and nothing more (no threads, no process
    group), and forking saves each rank importing torch again, most of a run's time.
    ``log``: a file that takes this process's and the ranks' stdout and stderr.
    """
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    mp.start_processes(
        main, args=(world, free_port(), path, value, phase, kill_rank, options), nprocs=world, join=True, start_method="fork"
    )


if __name__ == "__main__":
    path, value, phase, kill_rank = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    world = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    run(path, value, phase, kill_rank, options, world)
