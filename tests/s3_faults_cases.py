"""Per-rank cases of ``test_s3_faults.py``: saves and loads against a SeaweedFS server the test kills or stops.

A call expected to fail returns an :class:`Outcome`: when it ended (``time.monotonic()``,
the same clock in every process of the host, so the test can subtract the moment it
injected the fault) and every rank's error as ``{rank: (exception class name, message)}``.
``tools/s3_faults_table.py`` runs the same functions on ranks of its own.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from cases import local_matches, random_tensor, shard
from helpers import world_mesh
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import Shard

from dcp_safetensors import DcpSafetensorsError, SafetensorsReader, SafetensorsWriter


def full_state(shapes: list[tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """The full fp32 tensors of a save; another ``seed``, other values (an old and a new checkpoint differ)."""
    return {f"layers.{i}.weight": random_tensor(shape, torch.float32, seed + i) for i, shape in enumerate(shapes)}


def save_state(url: str, shapes: list[tuple[int, int]], seed: int, options: dict) -> None:
    """Save :func:`full_state` row-sharded (FSDP2's ``Shard(0)``): each rank uploads the parts of its rows."""
    mesh = world_mesh()
    state = {k: shard(v, mesh, [Shard(0)]) for k, v in full_state(shapes, seed).items()}
    dcp.save(state, storage_writer=SafetensorsWriter(url, storage_options=options))


def load_matches(url: str, shapes: list[tuple[int, int]], seed: int, options: dict) -> bool:
    """Load into ``Shard(1)`` (every rank reads bytes another rank wrote); whether it equals :func:`full_state`."""
    mesh = world_mesh()
    full = full_state(shapes, seed)
    target = {k: shard(torch.zeros_like(v), mesh, [Shard(1)]) for k, v in full.items()}
    dcp.load(target, storage_reader=SafetensorsReader(url, storage_options=options))
    return all(local_matches(target[k], full[k]) for k in full)


class Outcome(NamedTuple):
    """How one rank's call went: ``started``/``ended`` by ``time.monotonic()`` (one clock for every
    process of the host), every failing rank's ``(class name, message)`` or None, and what it returned."""

    started: float
    ended: float
    failures: dict[int, tuple[str, str]] | None
    value: Any = None


def outcome(fn, *args) -> Outcome:
    """Run ``fn(*args)``; DCP hands every rank the failures of all (``CheckpointException``); an error of
    ours raised outside DCP's collectives is this rank's own."""
    started = time.monotonic()
    try:
        value = fn(*args)
    except CheckpointException as e:
        return Outcome(started, time.monotonic(), {r: (type(exc).__name__, str(exc)) for r, (exc, _) in e.failures.items()})
    except DcpSafetensorsError as e:
        return Outcome(started, time.monotonic(), {dist.get_rank(): (type(e).__name__, str(e))})
    return Outcome(started, time.monotonic(), None, value)


def try_save(url: str, shapes: list[tuple[int, int]], seed: int, options: dict) -> Outcome:
    """:func:`save_state`, failing or not."""
    return outcome(save_state, url, shapes, seed, options)


def try_load(url: str, shapes: list[tuple[int, int]], seed: int, options: dict) -> Outcome:
    """:func:`load_matches`, failing or not (``value``: whether it loaded the tensors of ``seed``)."""
    return outcome(load_matches, url, shapes, seed, options)
