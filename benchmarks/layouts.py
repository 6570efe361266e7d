"""The parallel layouts the benchmark suite saves and loads (``benchmarks/suite.py --layout``).

Every layout is built on the meta device and materialised shard by shard, so
no rank ever holds more than its own shards. ``unit_bytes`` is the size of one
repeated block (a layer, a pair, an experts layer); a state has
``max(1, round(gib * 2**30 / unit_bytes))`` of them, so sizes follow ``--gib``
to the nearest block (``state_bytes`` is the exact figure, without building).

* ``fsdp``: 1-D mesh ``("dp",) = (world,)``; a stack of ``width x width``
  ``Linear`` layers, ``fully_shard`` per layer and at the root. Block: one layer.
* ``fsdp_tp``: 2-D mesh ``("dp", "tp") = (world / 2, 2)``, FSDP2 over TP as
  torchtitan does: pairs of ``up = Linear(width, 2 * width)`` (``ColwiseParallel``)
  and ``down = Linear(2 * width, width)`` (``RowwiseParallel``), each pair
  ``parallelize_module``'d on ``tp``, then ``fully_shard`` on ``dp`` per pair and
  at the root. Weights are ``(Shard(0) or _StridedShard(0), Shard(0 | 1))`` DTensors
  over both dims. Block: one pair, ``4 * width**2`` elements. Needs >= 4 ranks, even.
* ``hsdp_tp``: 3-D mesh ``("replicate", "shard", "tp") = (2, world / 4, 2)``
  (``(2, 1, 2)`` on 4 ranks): the same pairs, ``fully_shard`` with the 2-D
  ``("replicate", "shard")`` mesh (HSDP: replicated across ``replicate``, sharded
  within ``shard``). Weights carry ``(Replicate(), Shard(0)-like, Shard(0 | 1))``;
  ``check_placements`` asserts it. Needs a multiple of 4 ranks.
* ``ep_tp``: 2-D mesh ``("ep", "tp") = (world / 2, 2)``; a stand-in for an MoE
  layer's routed experts (torchtitan's ``GroupedExperts`` in the ``[E, in, out]``
  orientation): per layer ``E = 8`` experts (or ``ep`` if larger), each a
  ``width -> width / 4 -> width`` FFN, its two weights fused over experts:
  ``w1 [E, width, width / 4]`` placed ``(Shard(0), Shard(2))`` and
  ``w2 [E, width / 4, width]`` placed ``(Shard(0), Shard(1))``: experts split
  over ``ep``, the hidden dim over ``tp`` (column- then row-wise). Plain DTensor
  parameters (``torch.distributed.tensor.empty``), no router, no shared expert,
  no FSDP over the experts. Block: one layer, ``E * width**2 / 2`` elements
  (``4 * width**2`` with 8 experts). Needs >= 4 ranks, even.

Source states are random, seeded per shard (the mesh coordinate without the
``replicate`` dim), so HSDP replicas hold the same bytes, as in training.
"""

from __future__ import annotations

import torch

LAYOUTS = ["fsdp", "fsdp_tp", "hsdp_tp", "ep_tp"]
EXPERTS_PER_LAYER = 8


def mesh_of(layout: str, world: int) -> tuple[tuple[int, ...], tuple[str, ...]] | str:
    """``(shape, dim names)`` of ``layout``'s mesh on ``world`` ranks, or why it does not fit."""
    if layout == "fsdp":
        return (world,), ("dp",)
    if layout in ("fsdp_tp", "ep_tp"):
        if world < 4 or world % 2:
            return f"{layout} needs an even world of at least 4 ranks (a 2-D mesh, both dims >= 2)"
        return (world // 2, 2), ("dp", "tp") if layout == "fsdp_tp" else ("ep", "tp")
    if layout == "hsdp_tp":
        if world < 4 or world % 4:
            return "hsdp_tp needs a multiple of 4 ranks (replicate 2 x shard world/4 x tp 2)"
        return (2, world // 4, 2), ("replicate", "shard", "tp")
    raise ValueError(layout)


def experts_per_layer(world: int) -> int:
    ep = world // 2
    return max(EXPERTS_PER_LAYER, ep) // ep * ep


def unit_bytes(layout: str, width: int, elsize: int, world: int) -> int:
    """Bytes of one repeated block of ``layout``."""
    if layout == "fsdp":
        return width * width * elsize
    if layout in ("fsdp_tp", "hsdp_tp"):
        return 4 * width * width * elsize
    if layout == "ep_tp":
        return experts_per_layer(world) * 2 * width * (width // 4) * elsize
    raise ValueError(layout)


def blocks(layout: str, gib: float, width: int, elsize: int, world: int) -> int:
    return max(1, round(gib * 2**30 / unit_bytes(layout, width, elsize, world)))


def state_bytes(layout: str, gib: float, width: int, elsize: int, world: int) -> int:
    """What ``build`` allocates in all (each replica counted once), without building it."""
    return blocks(layout, gib, width, elsize, world) * unit_bytes(layout, width, elsize, world)


class _Pair(torch.nn.Module):
    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(2 * width, width, bias=False, dtype=dtype)


class _Experts(torch.nn.Module):
    """Fused expert weights ``w1 [E, width, width/4]``, ``w2 [E, width/4, width]`` as DTensors on (ep, tp)."""

    def __init__(self, experts: int, width: int, dtype: torch.dtype, mesh) -> None:
        from torch.distributed.tensor import Shard, empty

        super().__init__()
        hidden = width // 4
        self.w1 = torch.nn.Parameter(
            empty(experts, width, hidden, dtype=dtype, device_mesh=mesh, placements=[Shard(0), Shard(2)]),
            requires_grad=False)
        self.w2 = torch.nn.Parameter(
            empty(experts, hidden, width, dtype=dtype, device_mesh=mesh, placements=[Shard(0), Shard(1)]),
            requires_grad=False)


def make_mesh(layout: str, world: int, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_of(layout, world)
    if isinstance(shape, str):
        raise ValueError(shape)
    return init_device_mesh(device_type, shape[0], mesh_dim_names=shape[1])


def build(layout: str, gib: float, width: int, dtype: torch.dtype, device: torch.device, mesh,
          seed: int | None) -> torch.nn.Module:
    """``layout``'s model of about ``gib`` GiB on ``mesh``; local shards random (seeded per shard) or zero."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    elsize = torch.empty((), dtype=dtype).element_size()
    n = blocks(layout, gib, width, elsize, mesh.size())
    if layout == "fsdp":
        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear(width, width, bias=False, dtype=dtype) for _ in range(n)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=device)
    elif layout in ("fsdp_tp", "hsdp_tp"):
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        dp = mesh["dp"] if layout == "fsdp_tp" else mesh["replicate", "shard"]
        with torch.device("meta"):
            model = nn.Sequential(*[_Pair(width, dtype) for _ in range(n)])
        for pair in model:
            parallelize_module(pair, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
            fully_shard(pair, mesh=dp)
        fully_shard(model, mesh=dp)
        model.to_empty(device=device)
    elif layout == "ep_tp":
        # torch.distributed.tensor.empty allocates only the local shard, on the mesh's device type.
        model = nn.Sequential(*[_Experts(experts_per_layer(mesh.size()), width, dtype, mesh) for _ in range(n)])
    else:
        raise ValueError(layout)
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed * 1_000_003 + _shard_id(mesh))
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            if seed is None:
                local.zero_()
            else:
                local.normal_(generator=gen)
    return model


def _shard_id(mesh) -> int:
    """This rank's mesh coordinate without the ``replicate`` dim, as one number: equal on replicas."""
    ident = 0
    for size, name, coord in zip(mesh.shape, mesh.mesh_dim_names or (), mesh.get_coordinate()):
        if name != "replicate":
            ident = ident * size + coord
    return ident


def check_placements(layout: str, sd: dict) -> None:
    """Every tensor of the state dict is a DTensor over ``layout``'s whole mesh with the placements it implies."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    for key, v in sd.items():
        assert isinstance(v, DTensor), (key, type(v))
        names = v.device_mesh.mesh_dim_names
        placements = v.placements
        # FSDP2 over TP on the same dim gives _StridedShard(0) (not a Shard subclass in torch 2.14).
        sharded = [isinstance(p, (Shard, _StridedShard)) for p in placements]
        if layout == "fsdp":
            ok = len(placements) == 1 and sharded[0]
        elif layout == "fsdp_tp":
            ok = names == ("dp", "tp") and all(sharded)
        elif layout == "hsdp_tp":
            ok = (names == ("replicate", "shard", "tp") and isinstance(placements[0], Replicate)
                  and sharded[1] and sharded[2])
        elif layout == "ep_tp":
            ok = names == ("ep", "tp") and placements[0] == Shard(0) and placements[1] in (Shard(1), Shard(2))
        else:
            raise ValueError(layout)
        assert ok, f"{layout}: {key} has placements {placements} on mesh {names}"
