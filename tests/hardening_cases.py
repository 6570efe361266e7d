"""Per-rank cases for hardening: pipeline stages, re-saves, untouched callers, Partial placements."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import Pipeline, WithExperts, world_mesh
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate

import dcp_safetensors

# The submodules each stage of a helpers.Pipeline holds.
STAGES = (("embed", "layers.0", "layers.1"), ("layers.2", "layers.3", "norm", "lm_head", "mtp.0"))


def pipeline_reference(seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    return Pipeline()


def _stage(model: Pipeline, stage: int) -> nn.Module:
    """Drop the other stage's submodules, as a pipeline split does; keys keep their global names."""
    keep = STAGES[stage]
    for name in ("embed", "norm", "lm_head"):
        if name not in keep:
            delattr(model, name)
    for group in ("layers", "mtp"):
        modules = getattr(model, group)
        for key in list(modules):
            if f"{group}.{key}" not in keep:
                del modules[key]
    return model


def _pp_model(seed: int) -> tuple[nn.Module, int]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh["pp"].get_local_rank()
    model = _stage(pipeline_reference(seed), stage)
    for child in model.modules():
        if isinstance(child, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            fully_shard(child, mesh=mesh["dp"])
    return model, stage


def save_pipeline(path: str) -> list[str]:
    model, _ = _pp_model(seed=0)
    sd = get_model_state_dict(model)
    dcp_safetensors.save(sd, path, max_shard_size="2KB")
    return sorted(sd)


def load_pipeline(path: str) -> dict[str, bool]:
    """Load each stage's keys into a freshly initialised stage; compare with the seed-0 model."""
    model, _ = _pp_model(seed=1)
    sd = get_model_state_dict(model)
    dcp_safetensors.load(sd, path)
    expected = pipeline_reference(0).state_dict()
    return {k: torch.equal(v.full_tensor() if isinstance(v, DTensor) else v, expected[k]) for k, v in sd.items()}


def save_partial(path: str, reduce: bool) -> tuple[str, str] | None:
    """Save a Partial DTensor (each rank holds an addend); None if it saved, else (error type, message)."""
    mesh = world_mesh()
    local = torch.full((4,), float(dist.get_rank() + 1))
    value = DTensor.from_local(local, mesh, [Partial()], run_check=False)
    if reduce:
        value = value.redistribute(mesh, [Replicate()])
    try:
        dcp_safetensors.save({"w": value, "b": torch.ones(2)}, path)
    except Exception as e:  # noqa: BLE001 - the test compares what every rank raised
        return type(e).__name__, str(e)
    return None


def _snapshot(state: dict) -> list:
    """Everything a save must leave as it was: keys in order, the objects, dtypes, devices, bytes."""
    out = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            local = value.to_local() if isinstance(value, DTensor) else value
            placements = tuple(value.placements) if isinstance(value, DTensor) else None
            out.append((key, id(value), value.dtype, value.device, placements, local.data_ptr(), local.clone()))
        else:
            out.append((key, id(value), repr(value)))
    return out


def _same(before: list, after: list) -> bool:
    if len(before) != len(after):
        return False
    for b, a in zip(before, after, strict=True):
        if b[:-1] != a[:-1]:
            return False
        if isinstance(b[-1], torch.Tensor) and not torch.equal(b[-1], a[-1]):
            return False
    return True


def save_leaves_state_untouched(path: str) -> dict[str, bool]:
    """Save with every planner option that rewrites keys or tensors; the caller's state must not change."""
    from dcp_safetensors import KeyMapping, SafetensorsSavePlanner

    torch.manual_seed(0)
    model = WithExperts()
    fully_shard(model, mesh=world_mesh())
    state = get_model_state_dict(model)
    state["step"] = 7
    state["nested"] = {"lr": 0.5, "ids": torch.arange(3)}
    params = lambda: dict(model.named_parameters(remove_duplicate=False))  # noqa: E731 - the same objects each call
    before, nested_before, model_before = _snapshot(state), _snapshot(state["nested"]), _snapshot(params())
    planner = SafetensorsSavePlanner(mapping=KeyMapping(exclude=["draft.*"]), dtype=torch.bfloat16, hf_experts=True)
    dcp_safetensors.save(state, path, planner=planner)
    checks = {"save": _same(before, _snapshot(state)) and _same(nested_before, _snapshot(state["nested"]))}
    dcp_safetensors.save_submodule(model, "draft", path + "-draft")
    checks["save_submodule"] = _same(model_before, _snapshot(params()))
    checks["dtype"] = all(v.dtype == torch.float32 for v in model.parameters())
    return checks


def save_load_cycles(path: str, cycles: int) -> dict[str, list]:
    """Save + load ``cycles`` times; open fds, threads and RSS after the 10th and after the last."""
    import contextlib
    import os
    import threading
    import time

    import psutil
    from cases import sharded_mixed_state

    proc = psutil.Process()
    state = sharded_mixed_state()
    target = sharded_mixed_state("transpose")
    seen: dict[str, list] = {"fds": [], "threads": [], "rss_kib": [], "new_fds": []}
    opened: dict[str, str] = {}
    for cycle in range(1, cycles + 1):
        dcp_safetensors.save(state, path)
        dcp_safetensors.load(target, path)
        if cycle in (10, cycles):
            now = {}
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    now[fd] = os.readlink(f"/proc/self/fd/{fd}")
            seen["new_fds"] = sorted(set(now.values()) - set(opened.values())) if opened else []
            opened = now
            seen["fds"].append(len(now))
            # A pool's joined worker can still be tearing down in the kernel for a moment (one more
            # OS thread in CI once): the fewest of a few samples is the count that stays.
            samples = []
            for _ in range(5):
                samples.append(max(threading.active_count(), proc.num_threads()))
                time.sleep(0.01)
            seen["threads"].append(min(samples))
            seen["rss_kib"].append(proc.memory_info().rss >> 10)
    return seen


# --- failure matrix: an exception injected into one phase of the writer on one rank --------

PHASES = {
    "set-up": "set_up_storage_writer",
    "local plan": "prepare_local_plan",
    "global plan": "prepare_global_plan",  # the coordinator only
    "write": "_write_parts",  # the rank's part writes (pwrite / UploadPart), e.g. a full disk
    "commit": "commit_save",  # the storage's commit (the coordinator only), e.g. a failed rename
}


def _failing_writer(phase: str, fail_rank: int, path: str, **kwargs):
    """A real SafetensorsWriter whose step ``phase`` raises on ``fail_rank`` before doing its work."""
    from dcp_safetensors import SafetensorsWriter

    method = PHASES[phase]
    error = RuntimeError(f"injected failure in {phase} on rank {fail_rank}")

    def failing(self, *args, **kw):
        if dist.get_rank() == fail_rank:
            raise error
        return getattr(SafetensorsWriter, method)(self, *args, **kw)

    def storage_failing_to_commit(self):
        storage = SafetensorsWriter._storage(self)
        if dist.get_rank() == fail_rank:

            def commit_save(*args, **kw):
                raise error

            storage.commit_save = commit_save
        return storage

    override = {"_storage": storage_failing_to_commit} if method == "commit_save" else {method: failing}
    return type("FailingWriter", (SafetensorsWriter,), override)(path, **kwargs)


def save_with_injected_failure(path: str, phase: str, fail_rank: int, storage_options: dict | None = None):
    """(seconds until this rank raised, {failing rank: (type, message)} as DCP reports them)."""
    import time

    from cases import error_summary, sharded_mixed_state

    from dcp_safetensors import SafetensorsSavePlanner

    state = sharded_mixed_state()
    for v in state.values():
        if v.dtype != torch.bool:
            (v.to_local() if isinstance(v, DTensor) else v).fill_(9)
    writer = _failing_writer(phase, fail_rank, path, storage_options=storage_options)
    started = time.perf_counter()
    failures = error_summary(dcp.save, state, storage_writer=writer, planner=SafetensorsSavePlanner())
    return time.perf_counter() - started, failures
