"""2-rank dcp.async_save in PROCESS mode with our writer (pool workers are daemonic and cannot fork one).

Usage: python async_process_worker.py PATH; prints OK on every rank whose load matches.
(test_api.py calls :func:`run` in a process of ``helpers.process_context``: no new interpreter.)
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

sys.path.insert(0, os.path.dirname(__file__))

from cases import load_mixed, sharded_mixed_state  # noqa: E402
from helpers import free_port  # noqa: E402

from dcp_safetensors import SafetensorsWriter  # noqa: E402


def main(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    future = dcp.async_save(
        sharded_mixed_state(), storage_writer=SafetensorsWriter(path), async_checkpointer_type=AsyncCheckpointerType.PROCESS
    )
    future.result()
    dist.barrier()
    ok = load_mixed(path)
    print("OK" if all(ok.values()) else f"MISMATCH {[k for k, v in ok.items() if not v]}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run(path: str, stdout: str | None = None, stderr: str | None = None) -> None:
    """The 2-rank job; ``stdout``/``stderr``: files that take this process's and the ranks' output.

    Forked ranks (not spawned): nothing but imports has run here, and each rank is spared
    importing torch again. The checkpoint processes are torch's own, spawned either way.
    """
    for fd, name in ((1, stdout), (2, stderr)):
        if name is not None:
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
    mp.start_processes(main, args=(2, free_port(), path), nprocs=2, join=True, start_method="fork")


if __name__ == "__main__":
    run(sys.argv[1])
