"""Peak memory of fused-expert saves/loads and of ``save_submodule``, against the sizes they move.

A model of ``--layers`` MoE layers, each with transformers' fused experts
(``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``,
fp32), plus a ``draft`` submodule, FSDP2-sharded over 2 gloo ranks. Each phase
runs in fresh processes so its peak RSS is its own:

* save with ``hf_experts=True`` (per-expert keys, as ``save_pretrained``);
* load those per-expert keys into fused FSDP2 parameters (page cache evicted first);
* ``save_submodule(model, "draft", ...)``.

For each it reports every rank's peak RSS above its RSS before the call,
next to the experts' total size (and the base model's size for the submodule).

    python benchmarks/experts_memory.py --experts 32 --hidden 1024 --inter 1024 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import PeakRSS, evict
from torch import nn

import dcp_safetensors
from dcp_safetensors import SafetensorsLoadPlanner, SafetensorsSavePlanner


class Experts(nn.Module):
    def __init__(self, experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter))


class MoeLayer(nn.Module):
    def __init__(self, experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.experts = Experts(experts, hidden, inter)


class Model(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MoeLayer(args.experts, args.hidden, args.inter) for _ in range(args.layers)])
        self.draft = nn.Sequential(*[nn.Linear(args.hidden, args.hidden, bias=False) for _ in range(args.draft_layers)])


def build(args: argparse.Namespace, seed: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Model(args)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for unit in [*model.layers, model.draft]:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rank_main(rank: int, world: int, port: int, phase: str, args: argparse.Namespace, path: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = build(args, seed=0 if phase != "load" else 1)
    sd = get_model_state_dict(model)
    dist.barrier()
    with PeakRSS() as mem:
        started = time.perf_counter()
        if phase == "save":
            dcp_safetensors.save(sd, path, planner=SafetensorsSavePlanner(hf_experts=True))
        elif phase == "load":
            dcp_safetensors.load(sd, path, planner=SafetensorsLoadPlanner(hf_experts=True))
        else:
            dcp_safetensors.save_submodule(model, "draft", path + "-draft")
        dist.barrier()
        seconds = time.perf_counter() - started
    correct = True
    if phase == "load":
        expected = get_model_state_dict(build(args, seed=0))
        correct = all(torch.equal(sd[k].to_local(), expected[k].to_local()) for k in sd if "experts" in k)
    out[rank] = {"extra_MiB": (mem.peak - mem.base) / 2**20, "seconds": seconds, "correct": correct}
    dist.destroy_process_group()


def run(phase: str, args: argparse.Namespace, path: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(rank_main, args=(2, port, phase, args, path, out), nprocs=2, join=True)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--out", default="bench_out/experts_memory.json")
    args = parser.parse_args()
    experts_bytes = args.layers * args.experts * 3 * args.inter * args.hidden * 4
    draft_bytes = args.draft_layers * args.hidden * args.hidden * 4
    path = os.path.join(tempfile.mkdtemp(prefix="dcp-experts-"), "ckpt")
    results = {"experts_MiB": experts_bytes / 2**20, "base_model_MiB": (experts_bytes + draft_bytes) / 2**20,
               "draft_MiB": draft_bytes / 2**20}
    results["save"] = run("save", args, path)
    evict(path)
    results["load"] = run("load", args, path)
    results["save_submodule"] = run("save_submodule", args, path)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"experts {results['experts_MiB']:.0f} MiB, base model {results['base_model_MiB']:.0f} MiB, "
          f"draft {results['draft_MiB']:.0f} MiB, 2 ranks (FSDP2)")
    print("| phase | rank-0 / rank-1 peak extra RSS (MiB) | seconds | correct |")
    print("|---|---|---|---|")
    for phase in ("save", "load", "save_submodule"):
        r = results[phase]
        print(f"| {phase} | {r[0]['extra_MiB']:.0f} / {r[1]['extra_MiB']:.0f} | {r[0]['seconds']:.2f} | {r[0]['correct'] and r[1]['correct']} |")


if __name__ == "__main__":
    main()
