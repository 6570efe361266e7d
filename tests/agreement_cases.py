"""Per-rank cases of the divergent-options matrix (tests/test_agreement.py).

Each case makes one option or precondition of a planner, writer or reader
differ on the last rank only; ``run_case`` times the save or load until it
raises, then runs an ``all_reduce`` to show the process group still works.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from cases import shard
from helpers import world_mesh
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.tensor import Shard

import dcp_safetensors
from dcp_safetensors import (
    SafetensorsLoadPlanner,
    SafetensorsSavePlanner,
    SafetensorsWriter,
)
from dcp_safetensors.mapping import KeyMapping


def _odd() -> bool:
    """True on the rank whose option differs (the last)."""
    return dist.get_rank() == dist.get_world_size() - 1


def _state() -> dict[str, Any]:
    mesh = world_mesh()
    return {
        "model.w": shard(torch.arange(24.0).reshape(6, 4), mesh, [Shard(0)]),
        "model.b": torch.arange(4.0),
        "step": 3,
    }


def _save(root: str, *, writer: dict | None = None, planner: Any = None, path: str = "ckpt") -> None:
    dcp_safetensors.save(_state(), os.path.join(root, path), planner=planner, **(writer or {}))


def _plain_save(root: str, *, writer: dict | None = None, planner: Any = None) -> None:
    dcp.save(_state(), storage_writer=SafetensorsWriter(os.path.join(root, "ckpt"), **(writer or {})), planner=planner)


def _load(root: str, *, reader: dict | None = None, planner: Any = None, path: str = "ckpt", state: Any = None) -> None:
    dcp_safetensors.load(state if state is not None else _state(), os.path.join(root, path), planner=planner,
                         **(reader or {}))


def _without(key: str) -> dict[str, Any]:
    state = _state()
    del state[key]
    return state


def _odd_value(same: Any, other: Any) -> Any:
    return other if _odd() else same


SAVES: dict[str, Callable[[str], None]] = {
    "max_shard_size": lambda r: _save(r, writer={"max_shard_size": _odd_value("5GB", "64")}),
    "min_files": lambda r: _save(r, writer={"min_files": _odd_value(None, 1)}),
    "model_prefix": lambda r: _save(r, writer={"model_prefix": _odd_value(None, "model")}),
    "max_part": lambda r: _save(r, writer={"max_part": _odd_value(64 << 20, 1 << 20)}),
    "transfer_budget": lambda r: _save(r, writer={"transfer_budget": _odd_value(256 << 20, 1 << 20)}),
    "hf_config": lambda r: _save(r, writer={"hf_config": {"vocab_size": _odd_value(3, 4)}}),
    "path": lambda r: _save(r, path=_odd_value("ckpt", "other")),
    "invalid max_shard_size": lambda r: _save(r, writer={"max_shard_size": _odd_value("5GB", "5 gigs")}),
    "plain dcp.save, max_shard_size": lambda r: _plain_save(r, writer={"max_shard_size": _odd_value("5GB", "64")}),
    "mapping": lambda r: _save(r, planner=SafetensorsSavePlanner(mapping=_odd_value(None, KeyMapping(strip_prefix="model")))),
    "dtype": lambda r: _save(r, planner=SafetensorsSavePlanner(dtype=_odd_value(None, torch.bfloat16))),
    "hf_experts": lambda r: _save(r, planner=SafetensorsSavePlanner(hf_experts=_odd(), strict=False)),
    "strict": lambda r: _save(r, planner=SafetensorsSavePlanner(strict=_odd())),
    "enable_plan_caching": lambda r: _save(r, planner=SafetensorsSavePlanner(enable_plan_caching=_odd())),
    "dedup_save_to_lowest_rank": lambda r: _save(r, planner=SafetensorsSavePlanner(dedup_save_to_lowest_rank=_odd())),
    "planner class": lambda r: _plain_save(r, planner=_odd_value(SafetensorsSavePlanner(), DefaultSavePlanner())),
    "meta tensor": lambda r: dcp_safetensors.save({**_state(), "model.b": _odd_value(torch.ones(4), torch.empty(4, device="meta"))},
                                                  os.path.join(r, "ckpt")),
    "key mapping collision": lambda r: _save(r, planner=SafetensorsSavePlanner(
        mapping=KeyMapping(rename=_odd_value({}, {"model.b": "model.w"})))),
    "save_submodule of a submodule on no rank": lambda r: dcp_safetensors.save_submodule(
        _stages(), "head", os.path.join(r, "sub")),
}


def _stages() -> torch.nn.ModuleDict:
    """Two pipeline stages: ``body`` everywhere, ``draft`` on the last rank only."""
    torch.manual_seed(0)
    modules = {"body": torch.nn.Linear(4, 4)}
    if _odd():
        modules["draft"] = torch.nn.Linear(4, 2)
    return torch.nn.ModuleDict(modules)


def save_submodule_of_one_stage(root: str) -> dict[str, Any]:
    """``draft`` lives on the last stage only: saved from there, the other ranks take part."""
    model = _stages()
    dcp_safetensors.save_submodule(model, "draft", os.path.join(root, "draft"))
    return {k: v.clone() for k, v in model["draft"].state_dict().items()} if _odd() else {}

LOADS: dict[str, Callable[[str], None]] = {
    "path": lambda r: _load(r, path=_odd_value("ckpt", "old")),
    "model_prefix": lambda r: _load(r, reader={"model_prefix": _odd_value(None, "x")}),
    "broadcast_from_rank0": lambda r: _load(r, planner=SafetensorsLoadPlanner(broadcast_from_rank0=_odd())),
    "mapping": lambda r: _load(r, planner=SafetensorsLoadPlanner(mapping=_odd_value(None, KeyMapping(exclude=["step"])))),
    "dtype_policy": lambda r: _load(r, planner=SafetensorsLoadPlanner(dtype_policy=_odd_value("error", "cast"))),
    "hf_experts": lambda r: _load(r, planner=SafetensorsLoadPlanner(hf_experts=_odd())),
    "strict": lambda r: _load(r, planner=SafetensorsLoadPlanner(strict=_odd())),
    "allow_partial_load": lambda r: _load(r, planner=SafetensorsLoadPlanner(allow_partial_load=_odd())),
    "planner class": lambda r: _load(r, planner=_odd_value(SafetensorsLoadPlanner(), DefaultLoadPlanner())),
    "broadcast, key mapping collision": lambda r: _load(r, planner=SafetensorsLoadPlanner(
        broadcast_from_rank0=True, mapping=KeyMapping(rename=_odd_value({}, {"model.b": "model.w"})))),
    "broadcast, other plain tensors": lambda r: _load(r, planner=SafetensorsLoadPlanner(broadcast_from_rank0=True),
                                                     state=_without("model.b") if not _odd() else _state()),
}


def prepare(root: str) -> None:
    """The checkpoint the load cases read (and an older one under another path)."""
    _save(root)
    _save(root, path="old")


def run_case(kind: str, name: str, root: str) -> dict[str, Any]:
    """Run one case; how long until it raised, what, and whether an all_reduce works afterwards."""
    started = time.monotonic()
    error = None
    try:
        (SAVES if kind == "save" else LOADS)[name](root)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - started
    total = torch.ones(1)
    dist.all_reduce(total)
    return {"error": error, "seconds": seconds, "all_reduce": total.item()}


def local_knobs(root: str) -> None:
    """Options that only shape one rank's own work may differ: thread counts, a config passed on
    rank 0 only, a meta resolver on the ranks that have meta tensors, the stall watchdog's period."""
    _save(root, writer={"write_threads": _odd_value(8, 1)})
    _save(root, writer={"stall_warning": _odd_value(None, 5.0)})
    _load(root, reader={"stall_warning": _odd_value(0.5, None)})
    _save(root, writer={"hf_config": {"vocab_size": 3} if dist.get_rank() == 0 else None})
    _save(root, planner=SafetensorsSavePlanner(meta_resolver=_odd_value(None, lambda k, t: t)))
    _load(root, reader={"read_threads": _odd_value(8, 1)})
