"""CUDA tensors and NCCL: a save from GPU tensors is byte-identical to the CPU save.

Runs only where CUDA is available (``-ra`` prints the skip reason elsewhere).
With two or more GPUs the ranks use NCCL (one GPU each); with one GPU both
ranks hold CUDA tensors on it and talk over gloo.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine: the NCCL and CUDA-tensor checks need a GPU"
)


def _state(device: str, mesh) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    full = {
        "w": torch.randn(64, 48, generator=g),
        "b": torch.randn(48, generator=g).to(torch.bfloat16),
        "ids": torch.arange(10),
    }
    return {k: distribute_tensor(v.to(device), mesh, [Shard(0)]) if v.dim() == 2 else v.to(device) for k, v in full.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _rank(rank: int, world: int, port: int, device_type: str, path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dcp_safetensors

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    nccl = device_type == "cuda" and torch.cuda.device_count() >= world
    if device_type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if nccl else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    mesh = init_device_mesh(device_type, (world,))
    state = _state(device_type, mesh)
    dcp_safetensors.save(state, path)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp_safetensors.load(target, path)
    for k, v in state.items():
        assert torch.equal(_full(target[k]), _full(v)), k
    dist.destroy_process_group()


def test_a_two_rank_save_from_cuda_tensors_matches_the_cpu_save_byte_for_byte(tmp_path):
    for device_type in ("cpu", "cuda"):
        mp.spawn(_rank, args=(2, free_port(), device_type, str(tmp_path / device_type)), nprocs=2, join=True)
    cpu, gpu = (tmp_path / "cpu" / "model.safetensors").read_bytes(), (tmp_path / "cuda" / "model.safetensors").read_bytes()
    # The headers differ only in their snapshot ids; the data sections must be identical.
    n_cpu, n_gpu = int.from_bytes(cpu[:8], "little"), int.from_bytes(gpu[:8], "little")
    assert n_cpu == n_gpu and cpu[8 + n_cpu :] == gpu[8 + n_gpu :]
