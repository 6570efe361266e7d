"""Per-rank steps of the stateful save test (tests/test_plan_cache.py).

The test process holds the model of the state dict (``Spec``: key -> shape,
dtype, placement, seed) and the options; each step builds the state dict from
it on every rank, saves, and loads the checkpoint back. The same functions
run in one process without a process group (the 1-rank machine).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from cases import random_tensor, shard
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import dcp_safetensors
from dcp_safetensors import SafetensorsLoadPlanner, SafetensorsSavePlanner, SafetensorsWriter
from dcp_safetensors.mapping import KeyMapping

Spec = dict[str, tuple[tuple[int, ...], str, str, int]]
"""``{key: (shape, dtype name, placement, seed)}``; placements: plain, rep, s0, s1, 2d."""

DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64", "int32", "uint8")}

# A dtype of the same size and another kind, so a cast on save does not make the two alike.
_SAME_SIZE = {
    torch.float32: torch.int32, torch.int32: torch.float32, torch.bfloat16: torch.int16,
    torch.float16: torch.int16, torch.float64: torch.int64, torch.uint8: torch.int8,
}

# One caching planner per slot on this rank, reused across saves as a training loop does.
_PLANNERS: dict[str, SafetensorsSavePlanner] = {}


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def mapping_of(options: dict[str, Any]) -> KeyMapping | None:
    return KeyMapping(strip_prefix="model") if options["mapping"] == "strip" else None


def full_tensor(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    return random_tensor(tuple(shape), DTYPES[dtype], seed)


# The two meshes of the placements, made once per rank (each init_device_mesh makes process
# groups: it was a fifth of a save's time). A mesh of the same shape is the same to a plan.
_MESHES: dict[str, Any] = {}


def _mesh(kind: str) -> Any:
    if kind not in _MESHES:
        _MESHES[kind] = (
            init_device_mesh("cpu", (1, world()), mesh_dim_names=("dp", "tp")) if kind == "2d" else init_device_mesh("cpu", (world(),))
        )
    return _MESHES[kind]


def _place(full: torch.Tensor, placement: str) -> torch.Tensor:
    if placement == "plain" or world() == 1:
        return full
    if placement == "2d":
        return shard(full, _mesh("2d"), [Replicate(), Shard(min(1, full.dim() - 1))])
    return shard(full, _mesh("1d"), [{"rep": Replicate(), "s0": Shard(0), "s1": Shard(1)}[placement]])


def build(spec: Spec, diverged: str | None = None, zeros: bool = False) -> dict[str, Any]:
    """The state dict of ``spec`` on this rank; ``diverged``'s dtype differs on the last rank."""
    out = {}
    for key, (shape, dtype, placement, seed) in spec.items():
        full = full_tensor(shape, dtype, seed)
        if zeros:
            full = torch.zeros_like(full)
        if key == diverged and dist.is_initialized() and dist.get_rank() == world() - 1:
            full = full.view(_SAME_SIZE[full.dtype])  # only the dtype tells the ranks apart
        out[key] = _place(full, placement)
    return out


def _planner(options: dict[str, Any]) -> Any:
    kind = options["planner"]
    if kind == "dcp":
        return DefaultSavePlanner()
    settings = {"mapping": mapping_of(options), "dtype": DTYPES[options["planner_dtype"]] if options["planner_dtype"] else None}
    if kind == "fresh":
        return SafetensorsSavePlanner(**settings)
    slot = f"{options['slot']}:{settings}"  # a planner's options are fixed at construction
    if slot not in _PLANNERS:
        _PLANNERS[slot] = SafetensorsSavePlanner(enable_plan_caching=True, **settings)
    return _PLANNERS[slot]


def save_and_load(spec: Spec, options: dict[str, Any], path: str, diverged: str | None) -> dict[str, Any]:
    """Save ``spec``'s state at ``path``, then load it into zeros; the error or what differs."""
    state = build(spec, diverged)
    planner = _planner(options)
    writer_options = {"max_shard_size": options["max_shard_size"], "model_prefix": options["model_prefix"]}
    reuses = _Count("plan unchanged")
    log = logging.getLogger("dcp_safetensors")
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(reuses)
    try:
        if options["planner"] == "dcp":  # the README's plain form
            dcp.save(state, storage_writer=SafetensorsWriter(path, **writer_options), planner=planner,
                     no_dist=not dist.is_initialized())
        else:
            dcp_safetensors.save(state, path, planner=planner, **writer_options)
    except BaseException as e:  # noqa: BLE001 - the test decides whether it was expected (DCP's is a BaseException)
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        log.removeHandler(reuses)
        log.setLevel(level)
    target = build(spec, zeros=True)
    load_planner = SafetensorsLoadPlanner(
        mapping=mapping_of(options) if options["planner"] != "dcp" else None, dtype_policy="cast"
    )
    dcp_safetensors.load(target, path, planner=load_planner)
    wrong = []
    for key, (shape, dtype, _, seed) in spec.items():
        expected = full_tensor(shape, dtype, seed)
        cast = options["planner_dtype"] if options["planner"] != "dcp" else None
        if cast and expected.is_floating_point():
            expected = expected.to(DTYPES[cast]).to(expected.dtype)
        if not _matches(target[key], expected):
            wrong.append(key)
    return {"error": None, "wrong": wrong, "reused": reuses.count > 0}


def _matches(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``value`` has ``expected``'s dtype and shape and, on this rank, its values: a DTensor's
    local shard is compared with the same box of ``expected`` (every rank checks its own shard, so
    together they check the whole tensor without gathering it)."""
    if value.dtype != expected.dtype or value.shape != expected.shape:
        return False
    if isinstance(value, DTensor):
        shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        expected = expected[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        value = value.to_local()
    return value.shape == expected.shape and torch.equal(value, expected)


class _Count(logging.Handler):
    """Counts the log records that start with ``prefix`` (the writer's DEBUG line of a reused plan)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.DEBUG)
        self.prefix, self.count = prefix, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith(self.prefix)


def _saves(root: str, planners: list[SafetensorsSavePlanner]) -> list[str | None]:
    """Save the same state once per planner, each into its own directory: the error of each, or None."""
    state = {"w": torch.arange(6.0)}
    errors: list[str | None] = []
    for step, planner in enumerate(planners):
        try:
            dcp_safetensors.save(state, f"{root}/step{step}", planner=planner)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def new_planner_on_one_rank(root: str) -> list[str | None]:
    """Rank 0 starts a new caching planner for the second save while the others reuse theirs:
    that save is refused on every rank (their digests are unknown to it), the third works."""
    planner = SafetensorsSavePlanner(enable_plan_caching=True)
    fresh = SafetensorsSavePlanner(enable_plan_caching=True) if dist.get_rank() == 0 else planner
    return _saves(root, [planner, fresh, fresh])


def two_planners_on_one_rank(root: str) -> list[str | None]:
    """The last rank switches between two caching planners of the same options, the others keep one.

    Save 3 sends the digest of a plan whose layout the coordinator replaced in
    save 2: the reused layout's id is not the rank's, and every rank refuses
    before writing; save 4 plans from scratch.
    """
    ours = SafetensorsSavePlanner(enable_plan_caching=True)
    other = SafetensorsSavePlanner(enable_plan_caching=True) if dist.get_rank() == world() - 1 else ours
    return _saves(root, [ours, other, ours, ours])
