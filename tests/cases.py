"""Per-rank test cases, run by ``rank_pool.RankPool`` on every rank of a gloo group.

Each function builds its state deterministically from a seed, so the test
process can build the same full tensors to compare against.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import fsdp_toy, fully_shard_units, tp_mlp, world_mesh
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import dcp_safetensors
from dcp_safetensors import DcpSafetensorsError, SafetensorsReader, SafetensorsWriter

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 4).to(dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 2**15, shape, generator=g, dtype=torch.int64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64).to(dtype)


def shard(full: torch.Tensor, mesh, placements) -> DTensor:
    """A DTensor of ``full`` with this rank's local chunk, built without communication."""
    local_shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full[tuple(slice(o, o + s) for o, s in zip(offset, local_shape, strict=False))].clone()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


# --- state builders (deterministic; the test process calls them too) ---------------------


def mixed_state() -> dict[str, torch.Tensor]:
    """Full tensors of every dtype and awkward shape; the placements below shard them."""
    out = {f"dtypes.{str(dt).split('.')[-1]}": random_tensor((5, 3), dt, i) for i, dt in enumerate(ALL_DTYPES)}
    out.update(
        {
            "even": random_tensor((8, 6), torch.float32, 100),
            "uneven": random_tensor((5, 7), torch.float32, 101),
            "tiny": random_tensor((1, 3), torch.bfloat16, 102),
            "cols": random_tensor((6, 10), torch.float32, 103),
            "grid": random_tensor((6, 9), torch.float16, 104),
            "hsdp": random_tensor((7, 4), torch.float32, 105),
            "replicated": random_tensor((3, 4), torch.float32, 106),
            "plain": random_tensor((4, 4), torch.int64, 107),
            "scalar": random_tensor((), torch.float32, 108),
            "scalar_dt": random_tensor((), torch.int64, 109),
            "empty": random_tensor((0, 4), torch.float32, 110),
            "deep": random_tensor((2, 3, 4, 5), torch.float32, 111),
        }
    )
    return out


def mixed_placements(world_size: int):
    """Per key: (mesh shape, placements), or None for a plain tensor present on every rank."""
    flat = (world_size,)
    grid = (2, world_size // 2) if world_size % 2 == 0 and world_size >= 4 else flat
    two_d = len(grid) == 2
    out = {k: (flat, [Shard(0)]) for k in mixed_state() if k.startswith("dtypes.")}
    out.update(
        {
            "even": (flat, [Shard(0)]),
            "uneven": (flat, [Shard(0)]),
            "tiny": (flat, [Shard(0)]),
            "cols": (flat, [Shard(1)]),
            "grid": (grid, [Shard(0), Shard(1)] if two_d else [Shard(1)]),
            "hsdp": (grid, [Replicate(), Shard(0)] if two_d else [Shard(0)]),
            "replicated": (flat, [Replicate()]),
            "plain": None,
            "scalar": None,
            "scalar_dt": (flat, [Replicate()]),
            "empty": (flat, [Shard(0)]),
            "deep": (grid, [Shard(2), Shard(1)] if two_d else [Shard(2)]),
        }
    )
    return out


def sharded_mixed_state(reshard: str | None = None) -> dict[str, torch.Tensor]:
    """The mixed state as this rank holds it; ``reshard`` picks another layout to load into:
    ``"transpose"`` swaps Shard(0) and Shard(1) on every 2-D tensor, ``"plain"`` makes every
    tensor a plain full tensor (an unsharded model)."""
    ws = dist.get_world_size()
    meshes: dict[tuple[int, ...], object] = {}
    out = {}
    placements = mixed_placements(ws)
    full_state = mixed_state()
    if reshard == "plain":
        placements = dict.fromkeys(placements)
    elif reshard == "transpose":
        swap = {Shard(0): Shard(1), Shard(1): Shard(0)}
        for key, where in placements.items():
            if where is not None and full_state[key].dim() == 2:
                placements[key] = (where[0], [swap.get(p, p) for p in where[1]])
    for key, full in full_state.items():
        where = placements[key]
        if where is None:
            out[key] = full.clone()
            continue
        mesh_shape, pl = where
        if mesh_shape not in meshes:
            meshes[mesh_shape] = init_device_mesh("cpu", mesh_shape)
        out[key] = shard(full, meshes[mesh_shape], pl)
    return out


# --- cases --------------------------------------------------------------------------------


def save_mixed(path: str, max_shard_size="5GB", writer_kwargs: dict | None = None) -> None:
    writer = SafetensorsWriter(path, max_shard_size=max_shard_size, **(writer_kwargs or {}))
    dcp.save(sharded_mixed_state(), storage_writer=writer)


def save_mixed_row_rounds(path: str, writer_kwargs: dict) -> int:
    """Save the mixed state; the number of row-exchange rounds the plan gave every rank."""
    writer = SafetensorsWriter(path, **writer_kwargs)
    dcp.save(sharded_mixed_state(), storage_writer=writer)
    if writer._save is None:  # not the coordinator: the layout stays there
        return -1
    return len(writer._save.layout.rank_plans[0].row_rounds)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def local_matches(value, full: torch.Tensor) -> bool:
    """Whether this rank's part of ``value`` (DTensor or plain) equals the same box of ``full``, bit for bit."""
    if isinstance(value, DTensor):
        local_shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        expected = full[tuple(slice(o, o + s) for o, s in zip(offset, local_shape, strict=False))]
        value = value.to_local()
    else:
        expected = full
    return value.dtype == full.dtype and value.shape == expected.shape and torch.equal(as_bytes(value), as_bytes(expected))


def load_mixed(path: str, reshard: str | None = None, reader_kwargs: dict | None = None) -> dict[str, bool]:
    """Load into a zeroed, possibly differently sharded state; report per key whether it matches."""
    target = sharded_mixed_state(reshard)
    for v in target.values():
        (v.to_local() if isinstance(v, DTensor) else v).zero_()
    dcp.load(target, storage_reader=SafetensorsReader(path, **(reader_kwargs or {})))
    expected = mixed_state()
    return {key: local_matches(v, expected[key]) for key, v in target.items()}


def load_mixed_keys(path: str, keys: list[str], reshard: str | None = None) -> dict[str, bool]:
    """:func:`load_mixed` of ``keys`` only (a load that reads none of the other tensors' bytes)."""
    target = {k: v for k, v in sharded_mixed_state(reshard).items() if k in keys}
    for v in target.values():
        (v.to_local() if isinstance(v, DTensor) else v).zero_()
    dcp.load(target, storage_reader=SafetensorsReader(path))
    expected = mixed_state()
    return {key: local_matches(v, expected[key]) for key, v in target.items()}


def load_mixed_checking_on_rank_0(path: str) -> dict | None:
    """Every rank loads whole tensors; only rank 0 checks (``verify_checksums`` differs between ranks):
    :func:`error_summary` of it."""
    return error_summary(load_mixed, path, "plain", {"verify_checksums": dist.get_rank() == 0})


def extra_bytes_of_a_load(path: str, keys: list[str]) -> int:
    """The bytes a checked :func:`load_mixed_keys` read beyond those it asked for, on this rank."""
    import dcp_safetensors.reader as reader

    seen = []
    original = reader.CheckedReads

    class Counting(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    reader.CheckedReads = Counting
    try:
        assert all(load_mixed_keys(path, keys).values())
    finally:
        reader.CheckedReads = original  # the pool's processes run other cases next
    assert seen and all(r.tables for r in seen)
    return sum(r.bytes_read - r.bytes_asked for r in seen)


def error_summary(fn, *args, **kwargs):
    """Run ``fn``; return {failing rank: (exception class name, message)}, or None if it succeeded."""
    try:
        fn(*args, **kwargs)
    except CheckpointException as e:
        return {r: (type(exc).__name__, str(exc)) for r, (exc, _) in e.failures.items()}
    return None


# --- FSDP2 training resume ---------------------------------------------------------------


def _train_steps(model, optim, steps: range) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        idx = torch.randint(0, 37, (4, 6), generator=g)
        target = torch.randn(4, 6, 5, generator=g)
        loss = torch.nn.functional.mse_loss(model(idx), target)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    return losses


def train_save_resume(path: str) -> dict:
    """Train 3 steps, save model+optimizer+counters, train 3 more; resume a fresh model from the save."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_toy(seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, optim, range(3))
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "step": 3, "cfg": {"lr": 1e-2, "warmup": 0, "decay": 0.0, "on": False}}
    dcp.save(state, storage_writer=SafetensorsWriter(path, model_prefix="model"))
    reference = _train_steps(model, optim, range(3, 6))

    model2 = fsdp_toy(seed=1)
    optim2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    msd2, osd2 = get_state_dict(model2, optim2)
    state2 = {"model": msd2, "optim": osd2, "step": -1, "cfg": {"lr": 0.5, "warmup": 9, "decay": 1.0, "on": True}}
    dcp.load(state2, storage_reader=SafetensorsReader(path))
    set_state_dict(model2, optim2, model_state_dict=state2["model"], optim_state_dict=state2["optim"])
    resumed = _train_steps(model2, optim2, range(3, 6))
    cfg = state2["cfg"]
    return {
        "reference": reference,
        "resumed": resumed,
        "step": state2["step"],
        "cfg": cfg,
        "cfg_types": {k: type(v).__name__ for k, v in cfg.items()},
    }


# --- errors agreed on by every rank ------------------------------------------------------


def save_with_shape_clash(path: str):
    """Rank 1 declares a plain tensor with another shape than rank 0: a planning error everywhere."""
    shape = (4, 4) if dist.get_rank() == 0 else (4, 5)
    return error_summary(dcp.save, {"w": torch.ones(shape)}, storage_writer=SafetensorsWriter(path))


class _FailingPlanner(dcp.DefaultSavePlanner):
    def resolve_data(self, write_item):
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device (injected on rank 1)")
        return super().resolve_data(write_item)


def save_failing_on_rank1(path: str, value: float):
    sd = sharded_mixed_state()
    for v in sd.values():
        (v.to_local() if isinstance(v, DTensor) else v).fill_(value) if v.dtype != torch.bool else None
    return error_summary(dcp.save, sd, storage_writer=SafetensorsWriter(path), planner=_FailingPlanner())


def save_with_meta_on_rank1(path: str, kind: str):
    """DCP's default planner; rank 1 holds a meta tensor: its shard of a DTensor, or a plain tensor only it has."""
    sd = sharded_mixed_state()
    if dist.get_rank() == 1:
        if kind == "dtensor":
            w = sd["even"]
            local = torch.empty_like(w.to_local(), device="meta")
            sd["even"] = DTensor.from_local(local, w.device_mesh, w.placements, run_check=False, shape=w.shape, stride=w.stride())
        else:
            sd["rank1.extra"] = torch.empty(4, 4, device="meta")
    return error_summary(dcp.save, sd, storage_writer=SafetensorsWriter(path))


def load_missing(path: str):
    target = {"w": torch.zeros(3)}
    return error_summary(dcp.load, target, storage_reader=SafetensorsReader(path))


# --- larger row-sharded tensors (object-store parts and transfers) ----------------------


def big_state(shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {f"big.{i}": random_tensor(shape, torch.float32, 500 + i) for i, shape in enumerate(shapes)}


def save_big(path: str, shapes: list[tuple[int, int]], writer_kwargs: dict) -> None:
    mesh = world_mesh()
    sd = {k: shard(v, mesh, [Shard(0)]) for k, v in big_state(shapes).items()}
    dcp.save(sd, storage_writer=SafetensorsWriter(path, **writer_kwargs))


def try_save_big(path: str, shapes: list[tuple[int, int]], writer_kwargs: dict):
    return error_summary(save_big, path, shapes, writer_kwargs)


def save_big_failing_to_pack_on_rank_1(path: str, shapes: list[tuple[int, int]], writer_kwargs: dict):
    """``try_save_big`` where rank 1 fails while packing the bytes it sends another rank: (seconds, failures)."""
    import dcp_safetensors.collectives as collectives

    def fail(rnd, source):
        raise MemoryError("injected: no memory for the send buffer")

    original = collectives.pack_round
    if dist.get_rank() == 1:
        collectives.pack_round = fail
    try:  # the rank pool's processes serve later tests: put the function back
        started = time.perf_counter()
        failures = try_save_big(path, shapes, writer_kwargs)
        return time.perf_counter() - started, failures
    finally:
        collectives.pack_round = original


def load_big(path: str, shapes: list[tuple[int, int]], reader_kwargs: dict) -> bool:
    mesh = world_mesh()
    full = big_state(shapes)
    target = {k: shard(torch.zeros_like(v), mesh, [Shard(1)]) for k, v in full.items()}
    dcp.load(target, storage_reader=SafetensorsReader(path, **reader_kwargs))
    return all(local_matches(target[k], full[k]) for k in full)


def api_big(call: str, path: str, shapes: list[tuple[int, int]], options_by_rank: list[dict]) -> tuple[float, str | None, str]:
    """``dcp_safetensors.save`` (``call="save"``) or ``load`` with this rank's storage options:
    (seconds, error type or None, message)."""
    mesh = world_mesh()
    placement = [Shard(0)] if call == "save" else [Shard(1)]
    state = {k: shard(v if call == "save" else torch.zeros_like(v), mesh, placement) for k, v in big_state(shapes).items()}
    started = time.perf_counter()
    try:
        getattr(dcp_safetensors, call)(state, path, storage_options=options_by_rank[dist.get_rank()])
    except DcpSafetensorsError as e:
        return time.perf_counter() - started, type(e).__name__, str(e)
    return time.perf_counter() - started, None, ""


# --- high-level API, async save ----------------------------------------------------------


def api_roundtrip(path: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    import dcp_safetensors

    model = fsdp_toy(seed=0)
    sd = get_model_state_dict(model)
    config = {"model_type": "toy", "hidden_size": 16, "auto_map": {"AutoModel": "modeling_toy.Toy"}}
    dcp_safetensors.save({"model": sd, "step": 5}, path, model_prefix="model", hf_config=config)
    target = {"model": get_model_state_dict(fsdp_toy(seed=1)), "step": 0}
    dcp_safetensors.load(target, path)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    same = all(torch.equal(local(sd[k]), local(target["model"][k])) for k in sd)
    try:
        dcp_safetensors.load({"w": torch.zeros(2)}, path + "-missing")
        error = None
    except Exception as e:  # noqa: BLE001 - the test inspects the type
        error = type(e).__name__
    return {"same": same, "step": target["step"], "error": error}


def async_save_while_training(path: str) -> dict:
    """async_save, keep training while it is in flight, then check the checkpoint holds the state at the call."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    import dcp_safetensors
    from dcp_safetensors.demo import DemoModel

    torch.manual_seed(0)
    model = DemoModel(vocab=512, hidden=512, layers=4)
    mesh = world_mesh()
    fully_shard_units(model, model.layers, mesh)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    sd = get_model_state_dict(model)
    at_call = {k: v.to_local().clone() for k, v in sd.items()}
    future = dcp_safetensors.async_save(sd, path)
    steps_in_flight = 0
    while not future.done():
        idx = torch.randint(0, 512, (2, 8))
        model(idx).float().pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
        steps_in_flight += 1
    future.result()
    dist.barrier()
    live = get_model_state_dict(model)
    changed = any(not torch.equal(live[k].to_local(), at_call[k]) for k in at_call)
    torch.manual_seed(1)
    fresh = DemoModel(vocab=512, hidden=512, layers=4)
    fully_shard_units(fresh, fresh.layers, mesh)
    target = get_model_state_dict(fresh)
    dcp_safetensors.load(target, path)
    matches_call = all(torch.equal(target[k].to_local(), at_call[k]) for k in at_call)
    return {"steps_in_flight": steps_in_flight, "changed": changed, "matches_call": matches_call}


# --- FSDP2 + TP on the same dim (_StridedShard) -----------------------------------------


def _tp_fsdp_model(seed: int):
    """A 2 x 2 (dp, tp) mesh: TP colwise/rowwise linears, then FSDP2 over dp (same dim -> _StridedShard)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(seed)
    model = tp_mlp()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def save_tp_fsdp(path: str) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = _tp_fsdp_model(seed=0)
    sd = get_model_state_dict(model)
    dcp.save(sd, storage_writer=SafetensorsWriter(path))
    return sorted({str(p) for v in sd.values() for p in v.placements})


def load_tp_fsdp(path: str) -> bool:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(_tp_fsdp_model(seed=1))
    dcp.load(sd, storage_reader=SafetensorsReader(path))
    torch.manual_seed(0)
    full = tp_mlp().state_dict()
    return all(torch.equal(sd[k].full_tensor(), full[k]) for k in full)
