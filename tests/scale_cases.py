"""Per-rank cases for planning at scale: plan caching across saves, a multi-node torchrun job."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from helpers import fully_shard_units, small_mlp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import dcp_safetensors
from dcp_safetensors import writer as writer_module
from dcp_safetensors.demo import _exit_without_finalizing


def _model(seed: int, width: int = 16) -> nn.Module:
    """A seeded ``small_mlp`` under FSDP2 on ``fully_shard``'s default mesh (also under torchrun)."""
    torch.manual_seed(seed)
    model = small_mlp(width)
    return fully_shard_units(model, (model[0], model[2]), None)


def repeat_saves(root: str) -> list[dict]:
    """Save the same FSDP2 model three times with new values, then with a changed shape.

    Returns, per save, whether the writer planned the layout, the snapshot id
    and whether the saved values are the model's.
    """
    calls = []
    original = writer_module.plan_layout

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    writer_module.plan_layout = counting
    out = []
    try:
        model = _model(0)
        planner = dcp_safetensors.SafetensorsSavePlanner(enable_plan_caching=True)
        for step, width in enumerate((16, 16, 16, 24)):
            if width != 16:
                model = _model(step, width)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(step)
            state = get_model_state_dict(model)
            path = os.path.join(root, f"step{step}")
            before = len(calls)
            dcp_safetensors.save(state, path, planner=planner)
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
            loaded = dcp_safetensors.read_checkpoint(path)
            if dist.get_rank() == 0:
                import safetensors.torch

                saved = {}
                for name in {loc.file for loc in loaded.tensors.values()}:
                    saved.update(safetensors.torch.load_file(os.path.join(path, name)))
                same = sorted(saved) == sorted(full) and all(torch.equal(saved[k], full[k]) for k in full)
            else:
                same = True
            out.append({"planned": len(calls) > before, "snapshot": loaded.snapshot, "same": same})
    finally:
        writer_module.plan_layout = original
    return out


def caching_with_default_planner(root: str) -> str:
    """DCP's own planner with plan caching: the second save must fail clearly, not write stale plans."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    model = _model(0)
    state = get_model_state_dict(model)
    dcp.save(state, storage_writer=dcp_safetensors.SafetensorsWriter(os.path.join(root, "a")),
             planner=DefaultSavePlanner(enable_plan_caching=True))
    try:
        dcp.save(state, storage_writer=dcp_safetensors.SafetensorsWriter(os.path.join(root, "b")),
                 planner=DefaultSavePlanner(enable_plan_caching=True))
    except CheckpointException as e:  # DCP's wrapper of the coordinator's error
        return str(e)
    finally:
        from torch.distributed.checkpoint.planner import SavePlanner

        for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans, SavePlanner._cached_global_plan,
                      SavePlanner._cached_metadata, SavePlanner._cached_final_save_plan):
            cache.pop("DefaultSavePlanner", None)
    return "no error"


def torchrun_job(path: str, result: str) -> None:
    """Run by torchrun on every rank of a two-node job: save, load into a fresh model, compare."""
    dist.init_process_group("gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    node = int(os.environ["GROUP_RANK"])
    model = _model(7)
    dcp_safetensors.save(get_model_state_dict(model), path)
    fresh = _model(8)
    state = get_model_state_dict(fresh)
    dcp_safetensors.load(state, path)
    expected = get_model_state_dict(model)
    same = all(
        torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v, expected[k].full_tensor() if hasattr(expected[k], "full_tensor") else expected[k])
        for k, v in state.items()
    )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": rank, "local_rank": local_rank, "node": node, "same": same})
    if rank == 0:
        with open(result, "w") as f:
            json.dump(gathered, f)
    # Leave together: a rank tearing its group down while another still talks to the
    # store aborts in gloo's destructor.
    dist.barrier()
    dist.destroy_process_group()
    # Then leave without finalizing the interpreter: a gloo thread releasing the last works
    # during finalization aborts the process (~1 run in 100; the helper's docstring says why).
    _exit_without_finalizing(0)


if __name__ == "__main__":
    torchrun_job(sys.argv[1], sys.argv[2])
